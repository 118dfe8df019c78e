//! Which features need which subscription tier: one table, [`GATES`], read by every gated
//! handler and printed in the README.
//!
//! A tier is the text in `cascade_users.subscription_tier` (default `observer`, the free tier).
//! Billing sets it from the Stripe price a customer pays for; any tier other than `observer`
//! is a paid one. Handlers read the tier from the account's row in the request that needs it
//! (see `spaces::queries::tier`), not from the login session's cached copy: a tier change
//! applies to the next request, on every instance.

/// The free tier every account starts in.
pub const FREE_TIER: &str = "observer";

/// A feature some tiers may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    CreateSpace,
    Invest,
    ReadSpaces,
    JoinSpaces,
    ConsciousnessSessions,
}

/// Who may use a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Every account, `observer` included.
    AnyTier,
    /// Every tier but `observer`.
    PaidTiers,
}

/// The table: feature, who may use it, and how a refusal names it.
pub const GATES: &[(Feature, Allowed, &str)] = &[
    (Feature::CreateSpace, Allowed::PaidTiers, "creating a space"),
    (Feature::Invest, Allowed::PaidTiers, "investing"),
    (Feature::ReadSpaces, Allowed::AnyTier, "reading spaces"),
    (
        Feature::JoinSpaces,
        Allowed::AnyTier,
        "joining and leaving spaces",
    ),
    (
        Feature::ConsciousnessSessions,
        Allowed::AnyTier,
        "consciousness sessions",
    ),
];

/// Why a tier may not use a feature: the message of a 403.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} needs a paid subscription tier; this account's tier is {tier:?}")]
pub struct TierRefused {
    pub what: &'static str,
    pub tier: String,
}

/// `Ok` when an account of `tier` may use `feature`.
pub fn check(feature: Feature, tier: &str) -> Result<(), TierRefused> {
    let (_, allowed, what) = GATES
        .iter()
        .find(|(f, _, _)| *f == feature)
        .copied()
        .unwrap_or((feature, Allowed::PaidTiers, "this feature"));
    match allowed {
        Allowed::AnyTier => Ok(()),
        Allowed::PaidTiers if is_paid(tier) => Ok(()),
        Allowed::PaidTiers => Err(TierRefused {
            what,
            tier: tier.to_string(),
        }),
    }
}

/// Any tier but the free one (an empty tier is no tier: free).
pub fn is_paid(tier: &str) -> bool {
    !tier.is_empty() && tier != FREE_TIER
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_feature_is_in_the_table_once() {
        for feature in [
            Feature::CreateSpace,
            Feature::Invest,
            Feature::ReadSpaces,
            Feature::JoinSpaces,
            Feature::ConsciousnessSessions,
        ] {
            assert_eq!(
                GATES.iter().filter(|(f, _, _)| *f == feature).count(),
                1,
                "{feature:?}"
            );
        }
    }

    #[test]
    fn creating_a_space_and_investing_need_a_paid_tier() {
        let refused = check(Feature::CreateSpace, "observer").unwrap_err();
        assert_eq!(
            refused.to_string(),
            "creating a space needs a paid subscription tier; this account's tier is \"observer\""
        );
        assert!(check(Feature::Invest, "observer").is_err());
        assert!(check(Feature::CreateSpace, "").is_err());
        // Any tier STRIPE_PRICES_JSON names is paid, whatever its name (explorer too).
        for paid in ["participant", "architect", "explorer", "consciousness_pro"] {
            assert!(check(Feature::CreateSpace, paid).is_ok(), "{paid}");
            assert!(check(Feature::Invest, paid).is_ok(), "{paid}");
        }
        for free in [
            Feature::ReadSpaces,
            Feature::JoinSpaces,
            Feature::ConsciousnessSessions,
        ] {
            assert!(check(free, "observer").is_ok());
        }
    }
}
