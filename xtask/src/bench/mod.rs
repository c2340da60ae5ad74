//! `cargo xtask bench <area>`: runs the agent beside its peer under the same load.

mod challenge;
pub(crate) mod common;
mod dns;
mod dns_rrl;
mod fleet;
mod http;
mod l4;
mod shield;
mod waf;
pub(crate) mod wrk;

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let Some((area, rest)) = args.split_first() else {
        anyhow::bail!(
            "usage: cargo xtask bench <dns|dns-rrl|http|waf|l4|shield|challenge|fleet> [options]"
        );
    };
    match area.as_str() {
        "dns" => dns::run(rest),
        "dns-rrl" => dns_rrl::run(rest),
        "http" => http::run(rest),
        "waf" => waf::run(rest),
        "l4" => l4::run(rest),
        "shield" => shield::run(rest),
        "challenge" => challenge::run(rest),
        "fleet" => fleet::run(rest),
        other => {
            anyhow::bail!(
                "unknown bench area {other:?}: expected dns, dns-rrl, http, waf, l4, shield, challenge or fleet"
            )
        }
    }
}
