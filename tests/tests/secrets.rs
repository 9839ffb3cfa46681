//! No secret has a default: the binary refuses to start without a token
//! secret and an operator seed, except on the embedded quick start, which
//! generates them once into its data dir (mode 0600) and keeps them.

use std::process::{Command, Output};

use tests::binary;

fn mlsfed(config: &std::path::Path, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(binary("mlsfed"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("MLSFED_TOKEN_SECRET")
        .env_remove("MLSFED_OPERATOR_KEY_SEED")
        .env_remove("MLSFED_NATS_URL")
        .env_remove("MLSFED_DATA_DIR")
        .env("MLSFED_LOG", "warn")
        .output()?)
}

#[test]
fn a_configured_operator_without_secrets_does_not_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("mlsfed.toml");
    let data = dir.path().join("data").display().to_string();
    std::fs::write(
        &config,
        format!("domain = \"a.example\"\ndata_dir = {data:?}\nnats_url = \"nats://127.0.0.1:1\"\n"),
    )?;
    let out = mlsfed(&config, &["operator-key"])?;
    assert!(!out.status.success(), "started without secrets");
    assert!(String::from_utf8_lossy(&out.stderr).contains("token_secret"), "{}", String::from_utf8_lossy(&out.stderr));
    // The old documented placeholder is refused too.
    std::fs::write(
        &config,
        format!(
            "domain = \"a.example\"\ndata_dir = {data:?}\nnats_url = \"nats://127.0.0.1:1\"\ntoken_secret = \"dev-secret-change-me\"\n"
        ),
    )?;
    assert!(!mlsfed(&config, &["operator-key"])?.status.success(), "started with the placeholder secret");
    // A secret but no seed: the seed is no longer derived from the secret.
    std::fs::write(
        &config,
        format!(
            "domain = \"a.example\"\ndata_dir = {data:?}\nnats_url = \"nats://127.0.0.1:1\"\ntoken_secret = \"a-real-secret-of-some-length\"\n"
        ),
    )?;
    let out = mlsfed(&config, &["operator-key"])?;
    assert!(!out.status.success(), "started without an operator seed");
    assert!(String::from_utf8_lossy(&out.stderr).contains("operator_key_seed"));
    assert!(!dir.path().join("data/secrets.toml").exists(), "secrets were generated outside the quick start");
    Ok(())
}

#[test]
fn the_embedded_quick_start_generates_its_secrets_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("mlsfed.toml");
    let data = dir.path().join("data");
    std::fs::write(&config, format!("domain = \"a.example\"\ndata_dir = {:?}\n", data.display().to_string()))?;
    let first = mlsfed(&config, &["operator-key"])?;
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let secrets = data.join("secrets.toml");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&secrets)?.permissions().mode() & 0o777, 0o600);
    }
    let second = mlsfed(&config, &["operator-key"])?;
    assert_eq!(first.stdout, second.stdout, "the operator key changed between runs");
    // Another quick start gets another key.
    let other = tempfile::tempdir()?;
    let other_config = other.path().join("mlsfed.toml");
    std::fs::write(
        &other_config,
        format!("domain = \"a.example\"\ndata_dir = {:?}\n", other.path().join("data").display().to_string()),
    )?;
    assert_ne!(mlsfed(&other_config, &["operator-key"])?.stdout, first.stdout);
    Ok(())
}
