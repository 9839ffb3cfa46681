//! `mlsfed admin streams`: every mlsfed stream, KV bucket and object store
//! on the operator's NATS, with what it holds, its limits and its usage.

use super::Ctx;

pub(super) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let rows = mlsfed::inspect::streams(&ctx.js).await?;
    ctx.out.table(
        &rows,
        &[
            ("name", "NAME"),
            ("kind", "KIND"),
            ("messages", "MSGS"),
            ("bytes", "BYTES"),
            ("max_age_secs", "MAX_AGE(S)"),
            ("max_bytes", "MAX_BYTES"),
            ("max_msgs", "MAX_MSGS"),
            ("replicas", "R"),
            ("usage", "USAGE"),
        ],
    );
    Ok(())
}
