//! Config attacks: the agent polls the suite's fake Core, which answers with an endless or
//! oversized body, deeply nested JSON, invalid UTF-8, 100,000 domains, or a domain with a
//! million records; and an agent whose state directory cannot be written.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::core::CoreAnswer;
use super::harness::Setup;
use super::{Attack, Check, Ctx, Limits};

pub(crate) fn attacks() -> Vec<Attack> {
    vec![
        Attack {
            name: "config-endless-body",
            fast: false,
            setup: Setup::Core,
            expected: "a Core answer that never ends is cut at the body cap (256 MiB) or the 30 s poll timeout; the last good config keeps serving, /health shows the error, memory comes back, the next good answer is applied",
            peers: "no peer pulls config over HTTP; nginx's proxy_max_temp_file_size / client_max_body_size are the analogous caps",
            limits: Limits {
                rss_growth_mib: 64,
                ..Limits::DEFAULT
            },
            run: endless_body,
        },
        Attack {
            name: "config-oversized-body",
            fast: false,
            setup: Setup::Core,
            expected: "a Core answer declaring 1 GiB is refused at the body cap (256 MiB) without holding more; the last good config keeps serving",
            peers: "as above",
            limits: Limits {
                rss_growth_mib: 64,
                ..Limits::DEFAULT
            },
            run: oversized_body,
        },
        Attack {
            name: "config-deep-nesting",
            fast: true,
            setup: Setup::Core,
            expected: "100,000 nested arrays (and objects) are rejected (serde_json's recursion limit, 128) without a stack overflow; the last good config keeps serving and /health shows the error",
            peers: "knot and nginx read config files at reload; `nginx -t` / `knotc conf-check` refuse a broken one and the running config stays",
            limits: Limits::DEFAULT,
            run: deep_nesting,
        },
        Attack {
            name: "config-invalid-utf8",
            fast: false,
            setup: Setup::Core,
            expected: "invalid UTF-8 in a domain name and in luaCode is rejected as a whole document; the last good config keeps serving",
            peers: "as above",
            limits: Limits::DEFAULT,
            run: invalid_utf8,
        },
        Attack {
            name: "config-100k-domains",
            fast: false,
            setup: Setup::Core,
            expected: "100,000 domains (2 records each, 17 MB) compile and publish in seconds off the serving threads: DNS, HTTP and L4 keep answering during the reload; memory comes back after a return to the small config",
            peers: "knot: 100,000 zones load in seconds (zone loading in background threads); nginx: a reload starts new workers while old ones serve",
            limits: Limits {
                rss_growth_mib: 96,
                settle: Duration::from_secs(10),
                ..Limits::DEFAULT
            },
            run: hundred_thousand_domains,
        },
        Attack {
            name: "config-million-records",
            fast: false,
            setup: Setup::Core,
            expected: "one domain with 1,000,000 records (issue 17 finding 9: a quadratic route-table build stalled reloads for 53 s at 100,000) compiles in linear time off the serving threads; serving continues",
            peers: "knot: a zone of a million records loads in seconds; nginx has no such structure",
            limits: Limits {
                rss_growth_mib: 128,
                settle: Duration::from_secs(10),
                ..Limits::DEFAULT
            },
            run: million_records,
        },
        Attack {
            name: "config-state-unwritable",
            fast: true,
            setup: Setup::Core,
            expected: "a state directory that stops taking writes does not stop the agent: it applies Core's changes and warns that it cannot save the last good copy; a state directory that cannot be created at start is refused at once with a message naming it",
            peers: "nginx refuses to start when it cannot create its paths ([emerg] mkdir() failed) and logs write errors at run time; knot: a journal it cannot write is an error for that zone, the others keep serving",
            limits: Limits::DEFAULT,
            run: state_unwritable,
        },
    ]
}

/// The agent's `last_error` from /health.
fn last_error(ctx: &Ctx<'_>) -> String {
    ctx.agent()
        .health()
        .and_then(|health| health["last_error"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Serves `answer` until the agent has polled it `polls` times (or `limit` passed), then
/// the good document again, checking a new one is applied.
fn hostile_then_good(
    ctx: &mut Ctx<'_>,
    answer: CoreAnswer,
    polls: u64,
    limit: Duration,
) -> anyhow::Result<(String, String)> {
    let version_before = ctx.agent().config_version();
    let core = ctx
        .lab
        .core()
        .ok_or_else(|| anyhow::anyhow!("no fake Core"))?;
    let polls_before = core.polls();
    let streamed_before = core.streamed();
    core.set(answer);
    let started = Instant::now();
    while started.elapsed() < limit && core.polls() < polls_before + polls {
        std::thread::sleep(Duration::from_millis(100));
    }
    // One more second for the last poll to be read and judged.
    std::thread::sleep(Duration::from_secs(1));
    let error = last_error(ctx);
    let streamed = core.streamed() - streamed_before;
    let kept = ctx.agent().config_version() == version_before;
    let document = ctx.lab.document().to_string().into_bytes();
    let recovery = ctx.lab.apply_document(document, Duration::from_secs(60));
    let recovered = match recovery {
        Ok(after) => format!(
            "the next good document applied in {:.1} s",
            after.as_secs_f64()
        ),
        Err(error) => format!("NOT RECOVERED: {error:#}"),
    };
    Ok((
        format!(
            "{} polls in {:.0} s, {} MiB streamed, config {}; last_error {:?}",
            ctx.lab.core().map_or(0, |core| core.polls()) - polls_before,
            started.elapsed().as_secs_f64(),
            streamed / (1024 * 1024),
            if kept { "kept" } else { "CHANGED" },
            truncate(&error, 160)
        ),
        recovered,
    ))
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

fn endless_body(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let (observed, recovered) = hostile_then_good(
        ctx,
        CoreAnswer::Endless,
        2,
        Duration::from_secs(if ctx.fast { 10 } else { 40 }),
    )?;
    Ok(Check::new(
        !recovered.starts_with("NOT") && !observed.contains("CHANGED"),
        format!("{observed}; {recovered}"),
    ))
}

fn oversized_body(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let (observed, recovered) = hostile_then_good(
        ctx,
        CoreAnswer::Declared(1 << 30),
        2,
        Duration::from_secs(40),
    )?;
    Ok(Check::new(
        !recovered.starts_with("NOT") && !observed.contains("CHANGED"),
        format!("{observed}; {recovered}"),
    ))
}

fn deep_nesting(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let depth = 100_000;
    let mut arrays = String::from(r#"{"success":true,"domains":"#);
    arrays.push_str(&"[".repeat(depth));
    arrays.push_str(&"]".repeat(depth));
    arrays.push('}');
    let mut objects = String::from(r#"{"success":true,"domains":[{"domain":"deep.test","x":"#);
    for _ in 0..depth {
        objects.push_str(r#"{"a":"#);
    }
    objects.push('1');
    objects.push_str(&"}".repeat(depth));
    objects.push_str("}]}");
    let mut results = Vec::new();
    let mut ok = true;
    let polls = ctx.scale(1, 3) as u64;
    for (name, document) in [("arrays", arrays), ("objects", objects)] {
        let (observed, recovered) = hostile_then_good(
            ctx,
            CoreAnswer::document(document),
            polls,
            Duration::from_secs(10),
        )?;
        ok &= !recovered.starts_with("NOT") && !observed.contains("CHANGED");
        results.push(format!("{name}: {observed}; {recovered}"));
    }
    Ok(Check::new(ok, results.join(" | ")))
}

fn invalid_utf8(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let mut in_name = br#"{"success":true,"domains":[{"domain":"bad"#.to_vec();
    in_name.extend_from_slice(&[0xff, 0xfe]);
    in_name.extend_from_slice(br#".test","dnsRecords":[]}]}"#);
    let mut in_lua =
        br#"{"success":true,"domains":[{"domain":"lua.test","luaCode":"return "#.to_vec();
    in_lua.extend_from_slice(&[0xc3, 0x28, 0xa0, 0xa1]);
    in_lua.extend_from_slice(br#""}]}"#);
    let mut results = Vec::new();
    let mut ok = true;
    let polls = ctx.scale(1, 3) as u64;
    for (name, document) in [("domain name", in_name), ("luaCode", in_lua)] {
        let (observed, recovered) = hostile_then_good(
            ctx,
            CoreAnswer::Document(std::sync::Arc::new(document)),
            polls,
            Duration::from_secs(10),
        )?;
        ok &= !recovered.starts_with("NOT") && !observed.contains("CHANGED");
        results.push(format!("{name}: {observed}; {recovered}"));
    }
    Ok(Check::new(ok, results.join(" | ")))
}

/// The base document with `extra` domains spliced into its `domains` array.
fn with_domains(ctx: &mut Ctx<'_>, extra: impl FnOnce(&mut String)) -> Vec<u8> {
    let base = ctx.lab.document().to_string();
    let marker = r#""domains":["#;
    let at = base.find(marker).map_or(0, |at| at + marker.len());
    let mut document = String::with_capacity(base.len() + 64 * 1024 * 1024);
    document.push_str(&base[..at]);
    extra(&mut document);
    document.push_str(&base[at..]);
    document.into_bytes()
}

/// Applies `document` (big) and then the small base one, reporting both times.
fn big_then_small(ctx: &mut Ctx<'_>, document: Vec<u8>, what: &str) -> anyhow::Result<Check> {
    let size_mib = document.len() as f64 / (1024.0 * 1024.0);
    let rss_before = ctx.agent().usage().rss_kib;
    let applied = ctx.lab.apply_document(document, Duration::from_secs(180));
    let rss_loaded = ctx.agent().usage().rss_kib;
    let small = ctx.lab.document().to_string().into_bytes();
    let back = ctx.lab.apply_document(small, Duration::from_secs(180));
    let describe = |result: &anyhow::Result<Duration>| match result {
        Ok(after) => format!("published in {:.1} s", after.as_secs_f64()),
        Err(error) => format!("NOT published: {error:#}"),
    };
    Ok(Check::new(
        applied.is_ok() && back.is_ok(),
        format!(
            "{what} ({size_mib:.0} MiB of JSON) {}, RSS +{} MiB with it loaded; back to the small config {}",
            describe(&applied),
            rss_loaded.saturating_sub(rss_before) / 1024,
            describe(&back)
        ),
    ))
}

fn hundred_thousand_domains(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let count = ctx.scale(20_000, 100_000);
    let document = with_domains(ctx, |out| {
        for n in 0..count {
            let _ = write!(
                out,
                r#"{{"domain":"d{n}.example","dnsRecords":[{{"name":"@","type":"A","value":"192.0.2.{}","ttl":300}},{{"name":"www","type":"A","value":"192.0.2.{}","ttl":300,"httpProxyEnabled":true}}]}},"#,
                n % 250 + 1,
                n % 250 + 1
            );
        }
    });
    big_then_small(ctx, document, &format!("{count} domains"))
}

fn million_records(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let count = ctx.scale(100_000, 1_000_000);
    let document = with_domains(ctx, |out| {
        out.push_str(r#"{"domain":"big.example","dnsRecords":["#);
        for n in 0..count {
            let _ = write!(
                out,
                r#"{{"name":"r{n}","type":"A","value":"198.51.100.{}","ttl":300}},"#,
                n % 250 + 1
            );
        }
        out.push_str(r#"{"name":"@","type":"A","value":"198.51.100.1","ttl":300}]},"#);
    });
    big_then_small(ctx, document, &format!("one domain with {count} records"))
}

fn state_unwritable(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    // 1. The running agent's state directory stops taking writes: the temporary file the
    // last good copy is written through cannot be created (a directory holds its name).
    let blocker = ctx.lab.core_state_dir().join(".last-good.json.tmp");
    std::fs::create_dir_all(blocker.join("blocked"))?;
    let document = ctx.lab.document().to_string().into_bytes();
    let applied = ctx.lab.apply_document(document, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    let warned = ctx
        .agent()
        .log
        .recent_contains("cannot save the last good config");
    let _ = std::fs::remove_dir_all(&blocker);

    // 2. An agent started with a state directory that cannot be created.
    let config = ctx.lab.dir.join("state-probe.json");
    std::fs::write(&config, br#"{"success":true,"domains":[]}"#)?;
    let not_a_directory = ctx.lab.dir.join("state-probe-file");
    std::fs::write(&not_a_directory, b"a file where a directory should be")?;
    let started = Instant::now();
    let output = std::process::Command::new(ctx.lab.binary())
        .arg("--config")
        .arg(&config)
        .args([
            "--dns-listen",
            "off",
            "--http-listen",
            "127.0.0.1:0",
            "--https-listen",
            "off",
        ])
        .args(["--health-listen", "off", "--log-format", "json"])
        .arg("--state-dir")
        .arg(not_a_directory.join("state"))
        .stdin(std::process::Stdio::null())
        .output();
    let start_outcome = match output {
        Ok(output) if !output.status.success() => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let message = stderr
                .lines()
                .rev()
                .find(|line| line.contains("state"))
                .unwrap_or("")
                .trim()
                .to_owned();
            format!(
                "refuses to start in {:.1} s ({}): {}",
                started.elapsed().as_secs_f64(),
                output.status,
                truncate(&message, 120)
            )
        }
        Ok(output) => format!("exited {} (expected a refusal)", output.status),
        Err(error) => format!("could not be run: {error}"),
    };
    Ok(Check::new(
        applied.is_ok() && warned && start_outcome.starts_with("refuses"),
        format!(
            "running agent, state directory unwritable: the changed config {}, {}; \
             new agent with an uncreatable state directory {start_outcome}",
            match &applied {
                Ok(after) => format!("applied in {:.1} s", after.as_secs_f64()),
                Err(error) => format!("NOT applied: {error:#}"),
            },
            if warned {
                "with a warning that the last good copy cannot be saved"
            } else {
                "WITHOUT a warning about the last good copy"
            }
        ),
    ))
}
