//! Checksummed record framing, shared by the WAL and the manifest.
//!
//! ```text
//! +-------------+-------------+---------------------+
//! | len: u32 LE | crc: u32 LE | payload (len bytes) |
//! +-------------+-------------+---------------------+
//! crc = crc32(salt ++ payload)
//! ```
//!
//! The salt is never stored: the reader must know it. The manifest uses
//! none; a WAL segment uses its own number, so that records a recycled
//! segment file still holds from its earlier life never pass as its own.
//!
//! A `len` of zero never starts a record: files may be pre-allocated with
//! zeros, and a zero length marks the end of what was written. A record whose
//! length runs past the end of the file, or whose checksum fails, ends the
//! valid prefix; the caller decides whether what follows makes that a torn
//! tail or corruption.

// This module decodes bytes from disk or the network: what it reads must never
// make it panic. Where an index is safe by construction, a comment says why.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::storage::u32_le_at;

/// Bytes before the payload.
pub const HEADER_LEN: usize = 8;

/// `crc32(salt ++ parts)`.
fn checksum(salt: &[u8], parts: &[&[u8]]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(salt);
    for part in parts {
        crc.update(part);
    }
    crc.finalize()
}

/// Appends one framed record holding `payload` to `out`.
pub fn encode(out: &mut Vec<u8>, salt: &[u8], payload_parts: &[&[u8]]) {
    let len: usize = payload_parts.iter().map(|part| part.len()).sum();
    // Writing, not reading: callers bound what they frame.
    #[allow(clippy::expect_used)]
    let len = u32::try_from(len).expect("frame payloads are bounded far below 4 GiB by the write size limit");
    assert!(len > 0, "a frame payload is never empty");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(salt, payload_parts).to_le_bytes());
    for part in payload_parts {
        out.extend_from_slice(part);
    }
}

/// Why a scan stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Reached the end of the buffer exactly, or zeros (never-written space).
    End,
    /// The record at this offset is incomplete or fails its checksum.
    Bad { offset: usize, reason: String },
}

/// A frame header's `(len, crc)`, if `header` holds [`HEADER_LEN`] bytes.
fn parse_header(header: &[u8]) -> Option<(usize, u32)> {
    Some((u32_le_at(header, 0)? as usize, u32_le_at(header, 4)?))
}

/// The record starting at `offset`, if a valid one does: `(payload, next)`.
pub fn record_at<'a>(buf: &'a [u8], salt: &[u8], offset: usize) -> Result<Option<(&'a [u8], usize)>, String> {
    let Some(header) = offset.checked_add(HEADER_LEN).and_then(|end| buf.get(offset..end)) else {
        return if buf.len() <= offset || buf.get(offset..).is_some_and(|rest| rest.iter().all(|&b| b == 0)) {
            Ok(None)
        } else {
            Err("truncated record header".to_owned())
        };
    };
    let Some((len, expected)) = parse_header(header) else {
        return Err("truncated record header".to_owned());
    };
    if len == 0 {
        return if expected == 0 { Ok(None) } else { Err("zero-length record with a checksum".to_owned()) };
    }
    let start = offset + HEADER_LEN;
    let payload = start.checked_add(len).and_then(|end| buf.get(start..end)).ok_or_else(|| {
        format!("record of {len} bytes runs past the end ({} bytes left)", buf.len().saturating_sub(start))
    })?;
    let got = checksum(salt, &[payload]);
    if got != expected {
        return Err(format!("checksum mismatch: stored {expected:#010x}, computed {got:#010x}"));
    }
    Ok(Some((payload, start + len)))
}

/// Reads the valid records from `start`, calling `each(offset, payload)`,
/// and says why it stopped.
pub fn scan<'a>(buf: &'a [u8], salt: &[u8], start: usize, mut each: impl FnMut(usize, &'a [u8]) -> bool) -> Stop {
    let mut offset = start;
    loop {
        match record_at(buf, salt, offset) {
            Ok(None) => return Stop::End,
            Ok(Some((payload, next))) => {
                if !each(offset, payload) {
                    return Stop::Bad { offset, reason: "record rejected by its reader".to_owned() };
                }
                offset = next;
            }
            Err(reason) => return Stop::Bad { offset, reason },
        }
    }
}

/// Looks for valid records starting after `from` whose payload `wanted`
/// accepts. Used after a bad record to tell a torn tail (nothing valid
/// follows) from corruption. Only runs on the recovery path.
///
/// Every offset is tried, and `wanted` sees a candidate's payload before its
/// checksum is computed: in stale bytes (a recycled WAL segment's earlier
/// life) a length read at a random offset often spans megabytes, and a
/// caller that knows what a later record must hold rejects nearly every
/// candidate for the price of a comparison.
pub fn valid_records_after<'a>(
    buf: &'a [u8],
    salt: &'a [u8],
    from: usize,
    wanted: impl Fn(&[u8]) -> bool + 'a,
) -> impl Iterator<Item = (usize, &'a [u8])> {
    (from + 1..buf.len().saturating_sub(HEADER_LEN)).filter_map(move |offset| {
        let (len, expected) = parse_header(buf.get(offset..offset + HEADER_LEN)?)?;
        let start = offset + HEADER_LEN;
        let payload = buf.get(start..start.checked_add(len)?)?;
        (len > 0 && wanted(payload) && checksum(salt, &[payload]) == expected).then_some((offset, payload))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_zero_tail() {
        let mut buf = Vec::new();
        encode(&mut buf, &[], &[b"one"]);
        encode(&mut buf, &[], &[b"tw", b"o"]);
        buf.extend_from_slice(&[0; 32]);
        let mut seen = Vec::new();
        assert_eq!(
            scan(&buf, &[], 0, |_, p| {
                seen.push(p.to_vec());
                true
            }),
            Stop::End
        );
        assert_eq!(seen, vec![b"one".to_vec(), b"two".to_vec()]);
    }

    #[test]
    fn every_cut_stops_cleanly_at_a_record_boundary_or_reports_it() {
        let mut buf = Vec::new();
        for i in 0..5u8 {
            encode(&mut buf, &[], &[&[i; 7]]);
        }
        for cut in 0..buf.len() {
            let mut count = 0;
            let stop = scan(&buf[..cut], &[], 0, |_, _| {
                count += 1;
                true
            });
            let boundary = count * (HEADER_LEN + 7);
            match stop {
                Stop::End => assert_eq!(cut, boundary),
                Stop::Bad { offset, .. } => assert_eq!(offset, boundary),
            }
        }
    }

    #[test]
    fn flipped_byte_is_bad_and_later_records_are_found() {
        let mut buf = Vec::new();
        for i in 0..4u8 {
            encode(&mut buf, &[], &[&[i; 10]]);
        }
        buf[HEADER_LEN + 3] ^= 0x40;
        let stop = scan(&buf, &[], 0, |_, _| true);
        assert!(matches!(stop, Stop::Bad { offset: 0, .. }), "{stop:?}");
        assert_eq!(valid_records_after(&buf, &[], 0, |_| true).count(), 3);
        assert_eq!(valid_records_after(&buf, &[], 0, |payload| payload[0] == 3).count(), 1);
    }

    /// `wanted` is asked before the checksum is computed (it spares the
    /// checksum of what it refuses), so it sees records that fail theirs.
    #[test]
    fn valid_records_after_asks_before_it_checksums() {
        let mut buf = Vec::new();
        for i in 0..4u8 {
            encode(&mut buf, b"salt", &[&[i; 10]]);
        }
        let asked = std::cell::Cell::new(0);
        let found = valid_records_after(&buf, b"other", 0, |_| {
            asked.set(asked.get() + 1);
            true
        });
        assert_eq!(found.count(), 0);
        assert!(asked.get() >= 3, "{}", asked.get());
    }

    #[test]
    fn a_record_is_valid_only_under_the_salt_it_was_written_with() {
        let mut buf = Vec::new();
        encode(&mut buf, &7u64.to_le_bytes(), &[b"payload"]);
        assert_eq!(record_at(&buf, &7u64.to_le_bytes(), 0).unwrap().unwrap().0, b"payload");
        for other in [&8u64.to_le_bytes()[..], &[]] {
            assert!(record_at(&buf, other, 0).is_err());
            assert_eq!(valid_records_after(&buf, other, 0, |_| true).count(), 0);
        }
    }
}
