//! TLS at both edges: devices reach an operator over `https://` and `wss://`
//! (SDK and CLI, with the operator's CA), and NATS connections verify the
//! server's certificate (the federation tests run over `tls://` NATS).

use std::process::Command;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use tests::client::Device;
use tests::{binary, test_ca, NatsServer, Operator, TestCa, TlsProxy};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_and_cli_reach_an_https_operator() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let proxy = TlsProxy::start(&op.url).await?;
    assert!(proxy.url.starts_with("https://"));
    let ca = test_ca();

    // A device that does not trust the operator's CA gets nowhere.
    let eve = op.device_id("eve", "phone");
    let eve_home = tempfile::tempdir()?;
    let mut untrusting = Device::open(eve_home.path(), &proxy.url, &op.token(&eve), Some(&eve))?;
    let err = untrusting.publish_key_packages(1, true).await.expect_err("an unknown CA must be refused");
    assert!(err.code().is_none(), "the request reached the operator: {err}");

    let alice_id = op.device_id("alice", "phone");
    let home = tempfile::tempdir()?;
    let mut alice = Device::open(home.path(), &proxy.url, &op.token(&alice_id), Some(&alice_id))?;
    alice.trust_roots_pem(ca.ca_pem.as_bytes())?;
    alice.publish_key_packages(2, true).await?;
    let g = alice.create_group("tls").await?;

    // The CLI, one process per command, with --ca-file.
    let dave = op.device_id("dave", "cli");
    let dave_home = tempfile::tempdir()?;
    let cli = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(binary("mlsfed-client"))
            .arg("--home")
            .arg(dave_home.path())
            .args(["--server", &proxy.url, "--token", &op.token(&dave), "--device", dave.as_str()])
            .arg("--ca-file")
            .arg(&ca.ca_file)
            .args(args)
            .output()?;
        anyhow::ensure!(out.status.success(), "mlsfed-client {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    };
    cli(&["publish-key-packages", "--count", "2"])?;
    alice.add(&g, &[op.user_id("dave")]).await?;
    assert!(cli(&["sync"])?.contains("Joined"));

    // Push over wss://, through the same proxy.
    alice.sync().await?;
    let mut ws = alice.http().websocket(alice.cursor()).await?;
    ws.send(Message::Text(alice.follow_frame().into())).await?;
    let position = alice.send(&g, "over tls").await?;
    let pushed = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("closed"))??;
        if let Message::Text(t) = frame {
            if let tests::client::http::Frame::Entry(item) = serde_json::from_str(&t)? {
                if item.kind == "application" {
                    break item;
                }
            }
        }
    };
    assert_eq!(pushed.position, position);
    assert!(cli(&["sync"])?.contains("over tls"));
    Ok(())
}

/// A `tls://` NATS server's certificate is verified: a client that trusts
/// another CA cannot connect; one that trusts ours can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_certificates_are_verified() -> anyhow::Result<()> {
    let nats = NatsServer::start_secured_tls(&[])?;
    let (url, creds) = tests::config::split_credentials(&nats.url());
    let creds = creds.ok_or_else(|| anyhow::anyhow!("no credentials in the URL"))?;
    assert!(url.starts_with("tls://"), "{url}");
    let connect = |ca: std::path::PathBuf| {
        let (url, (user, pass)) = (url.clone(), creds.clone());
        async move {
            async_nats::ConnectOptions::with_user_and_password(user, pass)
                .add_root_certificates(ca)
                .require_tls(true)
                .connection_timeout(Duration::from_secs(5))
                .connect(url.as_str())
                .await
        }
    };
    let other = TestCa::generate()?;
    assert!(connect(other.ca_file.clone()).await.is_err(), "a certificate of another CA was accepted");
    let client = connect(test_ca().ca_file.clone()).await?;
    client.flush().await?;
    Ok(())
}
