//! Password hashing with argon2id.
//!
//! Parameters (OWASP's first recommendation): 19 MiB of memory, 2 passes, 1 lane, a 16-byte
//! random salt, a 32-byte output, stored as a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`)
//! so that stronger parameters later still verify old hashes. Hashing runs on the blocking
//! pool, at most [`MAX_CONCURRENT`] at a time, so a login flood cannot exhaust memory or the
//! async workers. The permit travels into the blocking task and is released when the hash
//! ends: a cancelled login (the client went away) cannot free it while its hash still runs,
//! since `spawn_blocking` work is never interrupted.

use std::sync::{Arc, OnceLock};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

/// Hashes computed at once; each holds 19 MiB.
pub const MAX_CONCURRENT: usize = 4;

fn argon2() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, Some(32)).expect("valid argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
}

impl Default for Passwords {
    fn default() -> Self {
        Passwords::with_limit(MAX_CONCURRENT)
    }
}

impl Passwords {
    /// At most `concurrent` hashes at once.
    pub fn with_limit(concurrent: usize) -> Self {
        Passwords {
            permits: Arc::new(Semaphore::new(concurrent.max(1))),
        }
    }

    /// The PHC string of `password` with a fresh salt.
    pub async fn hash(&self, password: &str) -> String {
        let password = password.to_owned();
        self.blocking(move || {
            argon2()
                .hash_password(password.as_bytes())
                .expect("argon2 hashing with valid parameters cannot fail")
                .to_string()
        })
        .await
    }

    /// Whether `password` matches `hash`. With `hash = None` (no such user) the same work is
    /// done against a fixed hash, so the answer takes as long as for a real account.
    pub async fn verify(&self, password: &str, hash: Option<String>) -> bool {
        let password = password.to_owned();
        self.blocking(move || {
            let known = hash.is_some();
            let hash = hash.unwrap_or_else(|| dummy_hash().to_string());
            let ok = PasswordHash::new(&hash)
                .map(|parsed| {
                    argon2()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false);
            ok && known
        })
        .await
    }

    /// Runs `work` on the blocking pool once a permit is free. The permit is moved into the
    /// blocking task: if the caller is cancelled, the work still runs to its end, and so does
    /// its hold on the permit.
    async fn blocking<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        tokio::task::spawn_blocking(move || {
            let result = work();
            drop(permit);
            result
        })
        .await
        .expect("password hashing does not panic")
    }
}

/// Computes the dummy hash ahead of the first login that needs it.
pub(crate) fn prepare() {
    dummy_hash();
}

/// A hash of a random password, computed once, to verify against when the user is unknown.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let random: String = super::token::random_bytes::<16>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        argon2()
            .hash_password(random.as_bytes())
            .expect("argon2 hashing with valid parameters cannot fail")
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_carry_their_parameters() {
        let passwords = Passwords::default();
        let hash = passwords.hash("correct horse battery staple").await;
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(
            passwords
                .verify("correct horse battery staple", Some(hash.clone()))
                .await
        );
        assert!(
            !passwords
                .verify("correct horse battery stapl", Some(hash.clone()))
                .await
        );
        assert_ne!(
            hash,
            passwords.hash("correct horse battery staple").await,
            "salted"
        );
        assert!(!passwords.verify("anything", None).await);
        assert!(!passwords.verify("x", Some("not a phc string".into())).await);
    }

    /// Closed until [`open`](Gate::open): what a hash in progress waits on in the test below.
    #[derive(Default)]
    struct Gate {
        open: std::sync::Mutex<bool>,
        opened: std::sync::Condvar,
    }

    impl Gate {
        fn wait(&self) {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }

        fn open(&self) {
            *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
            self.opened.notify_all();
        }
    }

    /// Opens the gate when the test ends, even by a failed assertion: the runtime waits for
    /// its blocking threads before the failure can be reported.
    struct OpenOnDrop(Arc<Gate>);

    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            self.0.open();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_logins_keep_their_permit_until_their_hash_ends() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::time::{Duration, Instant};

        const LIMIT: usize = 2;
        let passwords = Passwords::with_limit(LIMIT);
        let gate = Arc::new(Gate::default());
        let _opened_at_the_end = OpenOnDrop(gate.clone());
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        // A "hash" that counts how many run at once and lasts until the gate opens.
        let start = |passwords: &Passwords| {
            let passwords = passwords.clone();
            let (gate, running, most) = (gate.clone(), running.clone(), most.clone());
            tokio::spawn(async move {
                passwords
                    .blocking(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        gate.wait();
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
            })
        };

        let first: Vec<_> = (0..LIMIT).map(|_| start(&passwords)).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while running.load(Ordering::SeqCst) < LIMIT {
            assert!(Instant::now() < deadline, "the first hashes never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The clients of the running hashes go away mid-hash.
        for task in first {
            task.abort();
            assert!(task.await.unwrap_err().is_cancelled());
        }
        assert_eq!(
            passwords.permits.available_permits(),
            0,
            "a cancelled login gave its permit back while its hash still runs"
        );
        // More logins arrive; they must wait for the abandoned hashes.
        let second: Vec<_> = (0..2 * LIMIT).map(|_| start(&passwords)).collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.open();
        for task in second {
            task.await.unwrap();
        }
        // An abandoned hash may still be finishing on its thread (its permit can have been
        // handed on only after it counted itself out, but the later logins need not have
        // waited for both): give it time on a loaded machine.
        let deadline = Instant::now() + Duration::from_secs(10);
        while running.load(Ordering::SeqCst) != 0 {
            assert!(Instant::now() < deadline, "a hash never ended");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            most.load(Ordering::SeqCst) <= LIMIT,
            "{} hashes ran at once with {LIMIT} permits",
            most.load(Ordering::SeqCst)
        );
    }
}
