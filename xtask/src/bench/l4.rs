//! `cargo xtask bench l4`: placeholder until the l4 benchmark is written.

pub(crate) fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("the l4 benchmark is not built yet")
}
