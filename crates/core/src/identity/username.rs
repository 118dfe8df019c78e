//! Usernames: the one rule for what a username may be, and for when two spellings name the
//! same account.
//!
//! Case folding has one rule. A username is ASCII (letters, digits, `_`, `-`, `.`): two
//! spellings are one account when they are equal ignoring ASCII case. The rate limiter keys by
//! [`key`](Username::key) (ASCII lower case); PostgreSQL matches accounts with
//! `lower(username) = lower($1)`, both sides through the same `lower()` as the unique index,
//! so it agrees under any collation (even one, like Turkish, whose `lower('I')` is not `i`). Before this type, the limiter folded with Rust's full Unicode
//! `to_lowercase` while the lookup folded in PostgreSQL, so `bİll` (capital I with dot) was
//! the account `bill` to the lookup but a fresh rate-limit budget to the limiter; it is now
//! refused as a malformed username before anything is counted or looked up.

use super::{AuthError, USERNAME_MAX};

/// A username that passed [`Username::parse`]: 3 to 32 characters, ASCII letters, digits,
/// `_`, `-` and `.`, starting with a letter or a digit (so no NUL, no control character and
/// nothing that folds differently in PostgreSQL and in Rust).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username {
    /// As typed (the spelling an account keeps and shows).
    raw: String,
    /// `raw` in ASCII lower case: the identity of the account.
    key: String,
}

impl Username {
    /// The username `raw`, or a 400 naming the field `username`.
    pub fn parse(raw: &str) -> Result<Username, AuthError> {
        let invalid = |message: &str| AuthError::Invalid {
            field: "username",
            message: message.to_string(),
        };
        if raw.len() < 3 || raw.len() > USERNAME_MAX {
            return Err(invalid("username must be 3 to 32 characters long"));
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            return Err(invalid(
                "username may contain only letters, digits, '_', '-' and '.'",
            ));
        }
        if !raw.as_bytes()[0].is_ascii_alphanumeric() {
            return Err(invalid("username must start with a letter or a digit"));
        }
        Ok(Username {
            raw: raw.to_string(),
            key: raw.to_ascii_lowercase(),
        })
    }

    /// As typed.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The case-folded form: equal for every spelling of one account. Compare it with
    /// `lower(username)` in SQL and use it in rate-limit keys.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl std::fmt::Display for Username {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_name_share_one_key_and_unicode_look_alikes_are_refused() {
        let a = Username::parse("Bill.O-1").unwrap();
        let b = Username::parse("bILL.o-1").unwrap();
        assert_eq!(a.key(), b.key());
        assert_eq!(a.key(), "bill.o-1");
        assert_eq!(a.as_str(), "Bill.O-1");
        // Letters that PostgreSQL's lower() may fold to ASCII while Rust folds them to
        // something else (or not at all): never a username, so never a second budget.
        for bad in [
            "b\u{130}ll",   // LATIN CAPITAL LETTER I WITH DOT ABOVE
            "\u{212a}evin", // KELVIN SIGN
            "bi\u{307}ll",  // i + COMBINING DOT ABOVE
            "ali\u{e7}e",
            "bob\0",
            "\0bob",
            "bob smith",
            "-bob",
            "al",
        ] {
            let err = Username::parse(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    AuthError::Invalid {
                        field: "username",
                        ..
                    }
                ),
                "{bad:?}: {err:?}"
            );
        }
        assert!(Username::parse(&"a".repeat(USERNAME_MAX)).is_ok());
        assert!(Username::parse(&"a".repeat(USERNAME_MAX + 1)).is_err());
    }
}
