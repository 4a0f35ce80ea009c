//! etcd for the side-by-side bench: a three-member cluster on loopback
//! ([`EtcdCluster`], from Debian's `etcd-server`, installed by
//! `benches/setup-etcd.sh`), and a minimal client of its v3 API
//! ([`Etcd`]): `Put` and a `Txn` of puts, over gRPC, that is HTTP/2 with
//! each message a 5-byte prefix and protobuf, encoded here by hand (two
//! messages of two fields each need no code generator). One HTTP/2
//! connection per member carries every request in flight to it, as one
//! Quiver connection per node does.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use h2::client::SendRequest;

/// How long a new etcd cluster may take to elect a leader.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// Three etcd members on loopback, each with its data in `dir`; dropping
/// it kills them.
#[derive(Debug)]
pub struct EtcdCluster {
    children: Vec<Child>,
    /// The members' client addresses.
    pub endpoints: Vec<String>,
}

impl EtcdCluster {
    /// Starts three members (client ports `base+1..=base+3`, peer ports
    /// `base+11..=base+13`) on fresh directories under `dir`. A `Txn` may
    /// hold `txn_ops_max` operations (etcd's default is 128).
    pub fn start(dir: &Path, base: u16, txn_ops_max: usize) -> Result<EtcdCluster, String> {
        let peer = |i: u16| format!("http://127.0.0.1:{}", base + 10 + i);
        let initial: Vec<String> = (1..=3).map(|i| format!("n{i}={}", peer(i))).collect();
        let mut cluster = EtcdCluster { children: Vec::new(), endpoints: Vec::new() };
        for i in 1..=3u16 {
            let client = format!("http://127.0.0.1:{}", base + i);
            let log = std::fs::File::create(dir.join(format!("etcd-n{i}.log"))).map_err(|e| e.to_string())?;
            let child = Command::new("etcd")
                .args(["--name", &format!("n{i}")])
                .args(["--data-dir", &dir.join(format!("etcd-n{i}")).to_string_lossy()])
                .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer(i), "--initial-advertise-peer-urls", &peer(i)])
                .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "quiver-bench", "--listen-metrics-urls", ""])
                .args(["--max-txn-ops", &txn_ops_max.to_string()])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| format!("starting etcd (benches/setup-etcd.sh installs it): {e}"))?;
            cluster.children.push(child);
            cluster.endpoints.push(format!("127.0.0.1:{}", base + i));
        }
        Ok(cluster)
    }

    /// A client of every member, once a put through each succeeds.
    pub async fn ready(&self) -> Result<Vec<Etcd>, String> {
        let started = Instant::now();
        let mut clients = Vec::new();
        for endpoint in &self.endpoints {
            loop {
                let last = match Etcd::connect(endpoint).await {
                    Ok(client) => match client.put(b"ready", b"1").await {
                        Ok(()) => {
                            clients.push(client);
                            break;
                        }
                        Err(e) => e,
                    },
                    Err(e) => e,
                };
                if started.elapsed() > READY_WITHIN {
                    return Err(format!("etcd at {endpoint} did not take a put within {READY_WITHIN:?}: {last}"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(clients)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A connection to one etcd member.
#[derive(Clone, Debug)]
pub struct Etcd {
    send: SendRequest<Bytes>,
    endpoint: String,
}

impl Etcd {
    pub async fn connect(endpoint: &str) -> Result<Etcd, String> {
        let tcp = tokio::net::TcpStream::connect(endpoint).await.map_err(|e| format!("{endpoint}: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let (send, connection) = h2::client::handshake(tcp).await.map_err(|e| format!("{endpoint}: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Etcd { send, endpoint: endpoint.to_owned() })
    }

    /// One `Put`; returns once etcd acknowledged it (committed by a
    /// majority of members, each having written it to its fsynced log).
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), String> {
        self.call("/etcdserverpb.KV/Put", &put_request(key, value)).await
    }

    /// One `Txn` of puts, all or nothing: etcd's bulk write.
    pub async fn txn_puts<'a>(&self, entries: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Result<(), String> {
        let mut txn = Vec::new();
        for (key, value) in entries {
            let mut op = Vec::new();
            field(&mut op, 2, &put_request(key, value)); // RequestOp.request_put
            field(&mut txn, 2, &op); // TxnRequest.success
        }
        self.call("/etcdserverpb.KV/Txn", &txn).await
    }

    /// A unary gRPC call: `message` to `path`, success if `grpc-status` is 0.
    async fn call(&self, path: &str, message: &[u8]) -> Result<(), String> {
        let error = |e: h2::Error| e.to_string();
        let mut send = self.send.clone().ready().await.map_err(error)?;
        let request = http::Request::post(format!("http://{}{path}", self.endpoint))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .map_err(|e| e.to_string())?;
        let (response, mut stream) = send.send_request(request, false).map_err(error)?;
        let mut body = BytesMut::with_capacity(5 + message.len());
        body.put_u8(0);
        body.put_u32(message.len() as u32);
        body.extend_from_slice(message);
        stream.send_data(body.freeze(), true).map_err(error)?;
        let (head, mut body) = response.await.map_err(error)?.into_parts();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(error)?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.map_err(error)?;
        let status = trailers.as_ref().and_then(|t| t.get("grpc-status")).or(head.headers.get("grpc-status"));
        match status.map(|s| s.as_bytes()) {
            Some(b"0") => Ok(()),
            other => {
                let message = trailers.as_ref().and_then(|t| t.get("grpc-message"));
                Err(format!("{path}: grpc-status {other:?}, {message:?}"))
            }
        }
    }
}

/// `PutRequest { key = 1, value = 2 }`.
fn put_request(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(key.len() + value.len() + 8);
    field(&mut message, 1, key);
    field(&mut message, 2, value);
    message
}

/// A length-delimited protobuf field.
fn field(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    varint(out, u64::from(number) << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes protoc's encoding gives for these messages.
    #[test]
    fn messages_encode_as_protobuf() {
        assert_eq!(put_request(b"k", b"v"), [0x0a, 1, b'k', 0x12, 1, b'v']);
        let mut long = Vec::new();
        field(&mut long, 2, &[0; 300]);
        assert_eq!(&long[..3], [0x12, 0xac, 0x02], "300 as a varint");
    }
}
