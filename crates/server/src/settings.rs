//! Every setting of the composed application: the platform's and each module's, parsed
//! together so that `cascade --help` lists them all and every problem is reported at once.

use cascade_app::{AppConfig, RawAppConfig};
use cascade_catalog::{CatalogConfig, RawCatalogConfig};
use cascade_core::config::{Config, ConfigError, Parser, RawConfig};
use cascade_realtime::{RawRealtimeConfig, RealtimeConfig};

/// What `cascade` reads from flags and the environment, as text.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RawSettings {
    #[command(flatten)]
    pub core: RawConfig,
    #[command(flatten)]
    pub catalog: RawCatalogConfig,
    #[command(flatten)]
    pub app: RawAppConfig,
    #[command(flatten)]
    pub realtime: RawRealtimeConfig,
}

/// The validated settings of the platform and of each module.
#[derive(Debug, Clone)]
pub struct Settings {
    pub core: Config,
    pub catalog: CatalogConfig,
    pub app: AppConfig,
    pub realtime: RealtimeConfig,
}

/// Parses `RawSettings` from `--flag value` pairs only (tests build them from variables).
#[derive(clap::Parser)]
struct Flags {
    #[command(flatten)]
    raw: RawSettings,
}

impl Settings {
    /// Validates everything. The modules are parsed first because their cache namespaces
    /// (and TTLs such as `CONSCIOUSNESS_CACHE_TTL`) are what `CACHE_TTLS_JSON` is checked
    /// against; their problems are listed after the platform's.
    pub fn from_raw(raw: &RawSettings) -> Result<Settings, ConfigError> {
        let mut modules = Parser::new();
        let catalog = CatalogConfig::parse(&mut modules, &raw.catalog);
        let app = AppConfig::parse(&mut modules, &raw.app);
        let realtime = RealtimeConfig::parse(&mut modules, &raw.realtime);
        let namespaces = [catalog.namespaces(), app.namespaces()].concat();
        let mut p = Parser::new();
        let core = Config::parse(&mut p, &raw.core, &namespaces);
        p.absorb(modules);
        // CACHE_TTLS_JSON may override the patterns namespace: the app reads what the cache uses.
        let mut app = app;
        app.consciousness.cache_ttl = core.cache.ttl(cascade_app::config::PATTERNS);
        p.finish(Settings {
            core,
            catalog,
            app,
            realtime,
        })
    }

    /// Settings from `(VARIABLE, value)` pairs alone: the process environment and `.env` are
    /// not read, so a test gets exactly what it names.
    pub fn from_vars(vars: &[(&str, String)]) -> Result<Settings, String> {
        use clap::{CommandFactory, FromArgMatches};
        let command = Flags::command().mut_args(|arg| arg.env(None));
        let known = Flags::command();
        let mut argv = vec!["cascade".to_string()];
        for (var, value) in vars {
            let arg = known
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|env| env == *var))
                .ok_or_else(|| format!("no setting is read from {var}"))?;
            let long = arg.get_long().ok_or_else(|| format!("{var} has no flag"))?;
            // One argument, so a value that starts with `-` is not taken for a flag.
            argv.push(format!("--{long}={value}"));
        }
        let matches = command
            .try_get_matches_from(argv)
            .map_err(|e| e.to_string())?;
        let flags = Flags::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        Settings::from_raw(&flags.raw).map_err(|e| e.to_string())
    }

    /// The effective settings as `(VARIABLE, value)` rows, secrets redacted: what `cascade
    /// config` and `cascade check` print.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let mut rows = self.core.describe();
        rows.extend(self.catalog.describe());
        rows.extend(self.app.describe());
        rows.extend(self.realtime.describe());
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_settings_and_namespaces_are_known() {
        let settings = Settings::from_vars(&[
            ("USE_REDIS_BUNDLES", "false".into()),
            ("CONSCIOUSNESS_CACHE_TTL", "45".into()),
            (
                "CACHE_TTLS_JSON",
                r#"{"assets": 1500, "venice": 2000}"#.into(),
            ),
        ])
        .unwrap();
        assert!(!settings.catalog.use_redis_bundles);
        let cache = &settings.core.cache;
        assert_eq!(cache.ttl("patterns").as_secs(), 45);
        assert_eq!(settings.app.consciousness.cache_ttl.as_secs(), 45);
        assert_eq!(cache.ttl("assets").as_millis(), 1500);
        assert_eq!(cache.ttl("venice").as_millis(), 2000);
        assert_eq!(cache.ttl("listings").as_secs(), 180);
        assert_eq!(cache.key_name("assets"), "cache:asset");
        assert_eq!(cache.key_name("bundles"), "bundle");
        assert_eq!(cache.key_name("sessions"), "session");
        let rows = settings.describe();
        for var in [
            "DATABASE_URL",
            "USE_REDIS_BUNDLES",
            "VENICE_API_URL",
            "STRIPE_API_KEY",
        ] {
            assert!(rows.iter().any(|(v, _)| *v == var), "{var} missing");
        }
    }

    #[test]
    fn a_patterns_ttl_from_cache_ttls_json_is_the_one_the_app_sees() {
        let settings = Settings::from_vars(&[
            ("CONSCIOUSNESS_CACHE_TTL", "45".into()),
            ("CACHE_TTLS_JSON", r#"{"patterns": 7000}"#.into()),
        ])
        .unwrap();
        assert_eq!(settings.core.cache.ttl("patterns").as_millis(), 7000);
        assert_eq!(settings.app.consciousness.cache_ttl.as_millis(), 7000);
    }

    #[test]
    fn values_that_start_with_a_dash_are_values() {
        let err = Settings::from_vars(&[("PG_POOL_MIN", "-3".into())]).unwrap_err();
        assert!(
            err.contains("PG_POOL_MIN"),
            "a configuration error, not clap's: {err}"
        );
    }

    #[test]
    fn problems_of_every_group_are_reported_together() {
        let err = Settings::from_vars(&[
            ("PORT", "eighty".into()),
            ("USE_REDIS_BUNDLES", "maybe".into()),
            ("DUCAT_TO_USD_RATE", "0".into()),
            ("CACHE_TTLS_JSON", r#"{"asset": 1}"#.into()),
        ])
        .unwrap_err();
        for var in [
            "PORT",
            "USE_REDIS_BUNDLES",
            "DUCAT_TO_USD_RATE",
            "CACHE_TTLS_JSON",
        ] {
            assert!(err.contains(var), "{var} not in {err}");
        }
    }

    #[test]
    fn variables_no_setting_reads_are_refused() {
        assert!(Settings::from_vars(&[("NOT_A_SETTING", "1".into())]).is_err());
    }
}
