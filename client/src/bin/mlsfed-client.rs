//! `mlsfed-client`: a command-line MLS device. State lives in `--home` (sled),
//! so each command is a fresh process that resumes where the last one ended.
//! Events are printed as JSON lines.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use client::Device;

#[derive(Parser)]
#[command(name = "mlsfed-client", about = "An MLS device talking to its mlsfed operator")]
struct Cli {
    /// Directory holding this device's state.
    #[arg(long, env = "MLSFED_CLIENT_HOME")]
    home: PathBuf,
    /// The operator's API, e.g. http://127.0.0.1:8080
    #[arg(long, env = "MLSFED_SERVER")]
    server: String,
    /// Bearer token issued by the operator (`mlsfed token`).
    #[arg(long, env = "MLSFED_TOKEN")]
    token: String,
    /// Extra trusted root certificates (PEM), for an operator whose
    /// `https://` certificate comes from a private CA.
    #[arg(long, env = "MLSFED_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// The device id, needed the first time: mimi://<domain>/d/<user>/<device>
    #[arg(long)]
    device: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Upload KeyPackages (plus one last-resort).
    PublishKeyPackages {
        #[arg(long, default_value_t = 10)]
        count: usize,
    },
    /// Create a group hosted by this operator; prints its id.
    Create { room: String },
    /// Add every device of the given users.
    Add { group: String, users: Vec<String> },
    /// Send an application message.
    Send { group: String, text: String },
    /// Fetch and apply the mailbox and every group that advanced.
    Sync,
    /// Rotate this device's leaf.
    Update { group: String },
    /// Remove a member device.
    Remove { group: String, device: String },
    /// Print the device's groups with epoch and members.
    Status,
}

fn print(events: &[client::Event]) -> anyhow::Result<()> {
    for e in events {
        println!("{}", serde_json::to_string(e)?);
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let id = cli.device.as_deref().map(proto::DeviceId::parse).transpose().context("bad --device")?;
    std::fs::create_dir_all(&cli.home)?;
    let mut d = Device::open(&cli.home, &cli.server, &cli.token, id.as_ref())?;
    if let Some(ca) = &cli.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        d.trust_roots_pem(&pem)?;
    }
    let users = |us: &[String]| -> anyhow::Result<Vec<proto::UserId>> {
        us.iter().map(|u| proto::UserId::parse(u).with_context(|| format!("bad user {u}"))).collect()
    };
    match cli.cmd {
        Cmd::PublishKeyPackages { count } => d.publish_key_packages(count, true).await?,
        Cmd::Create { room } => println!("{}", d.create_group(&room).await?),
        Cmd::Add { group, users: us } => {
            d.add(&group, &users(&us)?).await?;
            print(&d.sync().await?)?
        }
        Cmd::Send { group, text } => {
            let position = d.send(&group, &text).await?;
            print(&d.sync().await?)?;
            println!("{}", serde_json::json!({ "position": position }));
        }
        Cmd::Sync => print(&d.sync().await?)?,
        Cmd::Update { group } => {
            d.update(&group).await?;
            print(&d.sync().await?)?
        }
        Cmd::Remove { group, device } => {
            d.remove(&group, &proto::DeviceId::parse(&device)?).await?;
            print(&d.sync().await?)?
        }
        Cmd::Status => {
            for g in d.groups() {
                println!("{}", serde_json::json!({ "group": g, "epoch": d.epoch(&g), "members": d.members(&g) }));
            }
        }
    }
    Ok(())
}
