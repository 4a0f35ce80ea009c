//! The smart client's retry rule, without I/O (the deterministic
//! simulation runs the same code as the model of its clients).
//!
//! A call about a key goes to the key's replicas in ring order, those the
//! ring says to avoid (a node cut off from its peers, or one seen down)
//! last. After an attempt that failed without applying anything (the node
//! could not be reached, is shutting down, or answered `Unavailable`: too
//! few replicas up as it sees them), the call goes on to the next replica.
//! After one that may have applied it (a timeout, a lost connection,
//! `Unconfirmed`) a blind write or a read goes on too, but a causal write
//! stops: sent again, it would stand beside its first copy as a sibling.
//! A causal write that goes on carries the same context. Every attempt
//! shares the call's one deadline; bad input stops at once.

/// What a failed attempt left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Nothing was applied: another replica may do it.
    NotApplied,
    /// It may have been applied (and may still be).
    InDoubt,
    /// Another replica would fail the same way, or the call's time is up.
    Final,
}

/// `replicas`, in ring order, with those in `avoid` moved last (each part
/// keeps its order).
pub fn order<T: PartialEq>(replicas: Vec<T>, avoid: &[T]) -> Vec<T> {
    let (last, mut first): (Vec<T>, Vec<T>) = replicas.into_iter().partition(|r| avoid.contains(r));
    first.extend(last);
    first
}

/// Retries a client made, by what the attempt before left behind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retries {
    /// After an attempt that applied nothing.
    pub not_applied: u64,
    /// After an attempt that may have applied the request (a blind write
    /// or a read that timed out, lost its connection or was unconfirmed).
    pub in_doubt: u64,
}

impl Retries {
    pub fn total(&self) -> u64 {
        self.not_applied + self.in_doubt
    }

    /// Counts a retry after an attempt that failed so.
    pub fn count(&mut self, after: Failure) {
        match after {
            Failure::InDoubt => self.in_doubt += 1,
            Failure::NotApplied | Failure::Final => self.not_applied += 1,
        }
    }
}

/// One call's attempts so far.
#[derive(Debug, Default)]
pub struct Attempts {
    causal: bool,
    /// Some attempt may have applied the request.
    in_doubt: bool,
}

impl Attempts {
    /// The attempts of a call; `causal`: a write with a context.
    pub fn new(causal: bool) -> Attempts {
        Attempts { causal, in_doubt: false }
    }

    /// Whether the call goes on to its next replica (if it has one, and
    /// time left) after an attempt that failed so.
    pub fn go_on(&mut self, failure: Failure) -> bool {
        self.in_doubt |= failure == Failure::InDoubt;
        match failure {
            Failure::NotApplied => true,
            Failure::InDoubt => !self.causal,
            Failure::Final => false,
        }
    }

    /// Whether an attempt may have applied the request.
    pub fn in_doubt(&self) -> bool {
        self.in_doubt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avoided_replicas_go_last_in_ring_order() {
        assert_eq!(order(vec![3, 1, 2], &[3]), vec![1, 2, 3]);
        assert_eq!(order(vec![3, 1, 2], &[1, 3]), vec![2, 3, 1]);
        assert_eq!(order(vec![3, 1, 2], &[]), vec![3, 1, 2]);
        assert_eq!(order(vec![3, 1, 2], &[3, 1, 2]), vec![3, 1, 2], "all avoided: ring order");
    }

    #[test]
    fn a_causal_write_goes_on_only_when_nothing_was_applied() {
        let mut blind = Attempts::new(false);
        assert!(blind.go_on(Failure::NotApplied));
        assert!(!blind.in_doubt());
        assert!(blind.go_on(Failure::InDoubt));
        assert!(blind.in_doubt());
        assert!(!blind.go_on(Failure::Final));

        let mut causal = Attempts::new(true);
        assert!(causal.go_on(Failure::NotApplied));
        assert!(!causal.go_on(Failure::InDoubt), "a second copy would be a sibling");
        assert!(!causal.go_on(Failure::Final));

        let mut retries = Retries::default();
        [Failure::NotApplied, Failure::InDoubt, Failure::NotApplied].into_iter().for_each(|f| retries.count(f));
        assert_eq!((retries, retries.total()), (Retries { not_applied: 2, in_doubt: 1 }, 3));
    }
}
