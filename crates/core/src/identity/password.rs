//! Password hashing with argon2id.
//!
//! Parameters (OWASP's first recommendation): 19 MiB of memory, 2 passes, 1 lane, a 16-byte
//! random salt, a 32-byte output, stored as a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`)
//! so that stronger parameters later still verify old hashes. Hashing runs on the blocking
//! pool, at most [`MAX_CONCURRENT`] at a time, so a login flood cannot exhaust memory or the
//! async workers.

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
        Passwords {
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT)),
        }
    }
}

impl Passwords {
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

    async fn blocking<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        tokio::task::spawn_blocking(work)
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
}
