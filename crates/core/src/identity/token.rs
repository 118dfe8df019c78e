//! Access tokens: HS256 JWTs signed with `JWT_SECRET`, and opaque refresh tokens.
//!
//! `jsonwebtoken` does the JWT format and claim validation. Its crypto is pluggable; we install
//! a provider that knows HS256 and nothing else (HMAC-SHA256 from the `hmac`/`sha2` crates
//! already in our tree), so no other algorithm can be verified even by mistake, and the RSA
//! and elliptic-curve stacks of its stock providers stay out of the build.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error as JwtError, ErrorKind};
use jsonwebtoken::signature::{Error as SignatureError, Signer, Verifier};
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation, decode, encode,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

type HmacSha256 = Hmac<Sha256>;

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id, as a string (RFC 7519).
    pub sub: String,
    /// The login session the token belongs to.
    pub sid: Uuid,
    pub jti: Uuid,
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    /// The user's subscription tier when the token was issued.
    pub tier: String,
}

/// Why a token was refused. The HTTP layer turns every variant into the same 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the access token has expired")]
    Expired,
    #[error("the access token is invalid: {0}")]
    Invalid(String),
}

/// Signs and verifies access tokens.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
}

impl TokenKeys {
    pub fn new(secret: &[u8], issuer: &str, audience: &str) -> Self {
        install_provider();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.leeway = 0;
        TokenKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
        }
    }

    /// A fresh random 32-byte key, for a process started without `JWT_SECRET`.
    pub fn random_secret() -> Vec<u8> {
        random_bytes::<32>().to_vec()
    }

    /// Issues a token for `user_id` in `session`, valid for `ttl`.
    pub fn issue(
        &self,
        user_id: i64,
        session: Uuid,
        tier: &str,
        ttl: Duration,
    ) -> (String, Claims) {
        let iat = now_secs();
        let claims = Claims {
            sub: user_id.to_string(),
            sid: session,
            jti: Uuid::new_v4(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat,
            exp: iat + ttl.as_secs().max(1),
            tier: tier.to_string(),
        };
        let token = encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing of serialisable claims cannot fail");
        (token, claims)
    }

    /// Verifies signature, algorithm, issuer, audience and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        match decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(err) => Err(match err.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(describe(&err)),
            }),
        }
    }
}

fn describe(err: &JwtError) -> String {
    match err.kind() {
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "algorithm not allowed".into()
        }
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing claim {claim}"),
        ErrorKind::ImmatureSignature => "not valid yet".into(),
        _ => "malformed token".into(),
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).expect("the operating system's random source is available");
    buf
}

/// A new opaque refresh token (256 random bits, hex) and the digest that is stored.
pub fn new_refresh_token() -> (String, Vec<u8>) {
    let token: String = random_bytes::<32>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let digest = refresh_digest(&token);
    (token, digest)
}

/// The token that rotating `presented` yields, and its digest: HMAC-SHA256 under `key` (a
/// server secret), hex. Deterministic, so a retry of a rotation whose response was lost can
/// be answered with the very successor the first answer carried, though only digests are
/// stored; unpredictable without `key`, so holding a token reveals nothing of later ones
/// except through a rotation. The first token of a session is random ([`new_refresh_token`]).
pub fn successor_refresh_token(key: &[u8], presented: &str) -> (String, Vec<u8>) {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(b"cascade refresh successor\0");
    mac.update(presented.as_bytes());
    let token: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let digest = refresh_digest(&token);
    (token, digest)
}

/// What the database keeps of a refresh token: its SHA-256, never the token itself.
pub fn refresh_digest(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

// --- the HS256-only crypto provider ---

fn install_provider() {
    static PROVIDER: CryptoProvider = CryptoProvider {
        signer_factory: signer,
        verifier_factory: verifier,
        key_utils: KeyUtils::new_unimplemented(),
    };
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        // Fails only if another provider was installed first; it would then be used instead.
        let _ = PROVIDER.install_default();
    });
}

struct Hs256(HmacSha256);

fn hs256(
    algorithm: &Algorithm,
    secret: &[u8],
    family: AlgorithmFamily,
) -> jsonwebtoken::errors::Result<Hs256> {
    if *algorithm != Algorithm::HS256 || family != AlgorithmFamily::Hmac {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    HmacSha256::new_from_slice(secret)
        .map(Hs256)
        .map_err(|_| ErrorKind::InvalidKeyFormat.into())
}

fn signer(
    algorithm: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    Ok(Box::new(hs256(algorithm, key.as_bytes(), key.family())?))
}

fn verifier(
    algorithm: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    Ok(Box::new(hs256(
        algorithm,
        key.try_get_as_bytes()?,
        key.family(),
    )?))
}

impl Signer<Vec<u8>> for Hs256 {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, SignatureError> {
        let mut mac = self.0.clone();
        mac.update(msg);
        Ok(mac.finalize().into_bytes().to_vec())
    }
}

impl Verifier<Vec<u8>> for Hs256 {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), SignatureError> {
        let mut mac = self.0.clone();
        mac.update(msg);
        // Constant-time comparison.
        mac.verify_slice(signature)
            .map_err(|_| SignatureError::new())
    }
}

impl JwtSigner for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

impl JwtVerifier for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn keys() -> TokenKeys {
        TokenKeys::new(SECRET, "cascade", "cascade-api")
    }

    /// Base64url of `{"alg":"none","typ":"JWT"}` and `{"alg":"HS512","typ":"JWT"}`.
    const NONE_HEADER: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
    const HS512_HEADER: &str = "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9";

    #[test]
    fn round_trip_and_claims() {
        let (token, claims) = keys().issue(42, Uuid::new_v4(), "observer", Duration::from_secs(60));
        let verified = keys().verify(&token).expect("valid token");
        assert_eq!(verified, claims);
        assert_eq!(verified.sub, "42");
        assert_eq!(verified.exp - verified.iat, 60);
    }

    #[test]
    fn refuses_tampering_other_algorithms_audiences_and_expiry() {
        let (token, _) = keys().issue(1, Uuid::new_v4(), "observer", Duration::from_secs(60));
        let parts: Vec<&str> = token.split('.').collect();

        // Payload changed, signature kept.
        let (other, _) = keys().issue(2, Uuid::new_v4(), "architect", Duration::from_secs(60));
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            other.split('.').nth(1).unwrap(),
            parts[2]
        );
        assert_eq!(
            keys().verify(&forged),
            Err(TokenError::Invalid("bad signature".into()))
        );

        // alg: none, no signature.
        let none = format!("{NONE_HEADER}.{}.", parts[1]);
        assert!(matches!(keys().verify(&none), Err(TokenError::Invalid(_))));

        // A token really signed with HS512 and the same secret is still refused, for its
        // algorithm (not its signature): only HS256 is accepted.
        let signing_input = format!("{HS512_HEADER}.{}", parts[1]);
        let mut mac = Hmac::<sha2::Sha512>::new_from_slice(SECRET).unwrap();
        mac.update(signing_input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        let hs512 = format!("{signing_input}.{signature}");
        assert_eq!(
            keys().verify(&hs512),
            Err(TokenError::Invalid("algorithm not allowed".into()))
        );

        // Another secret.
        let stranger = TokenKeys::new(
            b"another-secret-another-secret-xx",
            "cascade",
            "cascade-api",
        );
        assert!(matches!(
            stranger.verify(&token),
            Err(TokenError::Invalid(_))
        ));

        // Wrong audience.
        let elsewhere = TokenKeys::new(SECRET, "cascade", "someone-else");
        assert_eq!(
            elsewhere.verify(&token),
            Err(TokenError::Invalid("wrong audience".into()))
        );

        // Expired.
        let mut claims = keys().verify(&token).unwrap();
        claims.exp = now_secs() - 1;
        claims.iat = now_secs() - 61;
        let expired = encode(&Header::new(Algorithm::HS256), &claims, &keys().encoding).unwrap();
        assert_eq!(keys().verify(&expired), Err(TokenError::Expired));
    }

    #[test]
    fn successors_are_deterministic_per_key_and_token() {
        let (a, digest) = successor_refresh_token(b"key one", "token");
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(digest, refresh_digest(&a));
        assert_eq!(successor_refresh_token(b"key one", "token").0, a);
        assert_ne!(successor_refresh_token(b"key two", "token").0, a);
        assert_ne!(successor_refresh_token(b"key one", "token2").0, a);
    }

    #[test]
    fn refresh_tokens_are_random_and_stored_as_digests() {
        let (a, da) = new_refresh_token();
        let (b, _) = new_refresh_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(refresh_digest(&a), da);
        assert_ne!(da, a.as_bytes());
    }
}
