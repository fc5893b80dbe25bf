//! The sidecar's configuration file: the type is the contract both the operator and the
//! sidecar depend on (`soma-contract`, [`Config`]); this module adds what only the running
//! sidecar does with it, reading the environment variables the file names. Every field is
//! documented in `docs/sidecar.md`.

pub use soma_contract::{
    AgentIdentity, AuthorityConfig, Credentials, LiveSettings, PostgresAuthority, ProviderConfig,
    ProviderKind, SidecarConfig as Config, Timeouts,
};

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not parse or has wrong fields.
    #[error(transparent)]
    Parse(#[from] soma_contract::ConfigError),
    /// A `...Env` field names an environment variable that is unset or empty.
    #[error("{field} names the environment variable {var}, which is not set")]
    MissingEnv {
        /// The configuration field.
        field: &'static str,
        /// The variable it names.
        var: String,
    },
}

/// Fills the fields that the file names an environment variable for (`databaseUrlEnv`), and
/// a Vault address the file leaves out from `VAULT_ADDR` (Vault's own convention), reading
/// variables through `var`. A named variable that is unset or empty is an error:
/// starting without the ledger the operator asked for would look healthy and meter nothing.
pub fn apply_env(
    config: &mut Config,
    var: impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    if config.database_url.is_none()
        && let Some(name) = &config.database_url_env
    {
        match var(name).filter(|v| !v.trim().is_empty()) {
            Some(url) => config.database_url = Some(url),
            None => {
                return Err(ConfigError::MissingEnv {
                    field: "databaseUrlEnv",
                    var: name.clone(),
                });
            }
        }
    }
    if let Credentials::Vault(v) = &mut config.credentials
        && v.address.is_none()
    {
        v.address = var("VAULT_ADDR").filter(|a| !a.trim().is_empty());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_from_the_environment() {
        let base = r#""agent": {"namespace": "a", "name": "b"}, "provider": {"kind": "openai", "upstream": "http://x", "model": "m"}, "credentials": "none", "clientTokenEnv": "T""#;
        let doc = format!(r#"{{{base}, "databaseUrlEnv": "SOMA_DATABASE_URL"}}"#);
        let mut c = Config::parse(&doc).unwrap();
        apply_env(&mut c, |n| {
            (n == "SOMA_DATABASE_URL").then(|| "postgres://u:p@db/soma".into())
        })
        .unwrap();
        assert_eq!(c.database_url.as_deref(), Some("postgres://u:p@db/soma"));

        let mut c = Config::parse(&doc).unwrap();
        let err = apply_env(&mut c, |_| Some(" ".into())).unwrap_err();
        assert!(err.to_string().contains("SOMA_DATABASE_URL"), "{err}");
        assert!(c.database_url.is_none());

        // An explicit URL wins and the variable is not needed.
        let doc = format!(
            r#"{{{base}, "databaseUrl": "postgres://x/y", "databaseUrlEnv": "SOMA_DATABASE_URL"}}"#
        );
        let mut c = Config::parse(&doc).unwrap();
        apply_env(&mut c, |_| None).unwrap();
        assert_eq!(c.database_url.as_deref(), Some("postgres://x/y"));
    }
}
