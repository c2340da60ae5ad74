//! `defenra-agent check-config FILE`: compile a document and print every problem.

use std::path::Path;
use std::process::ExitCode;

/// Compiles `file` exactly as the agent would (including the WAF scripts) and prints every
/// issue with its JSON path. Exit 0 when clean, 1 when there is any problem.
pub(crate) fn check_config(file: &Path) -> ExitCode {
    let doc = match defenra_config::read_document(file, defenra_config::MAX_DOCUMENT_BYTES) {
        Ok(doc) => doc,
        Err(error) => {
            eprintln!("{}: cannot read: {error}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let compiled = match defenra_config::compile(&doc) {
        Ok(compiled) => compiled,
        Err(rejected) => {
            eprintln!("{}: {rejected}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let mut issues = compiled.issues;
    issues.extend(defenra_waf::check_scripts(&compiled.snapshot));
    let snapshot = &compiled.snapshot;
    for issue in &issues {
        println!("{}: {issue}", file.display());
    }
    println!(
        "{}: {} domains, {} records, {} proxies, {} problem{}",
        file.display(),
        snapshot.domains.len(),
        snapshot.n_records(),
        snapshot.proxies.len(),
        issues.len(),
        if issues.len() == 1 { "" } else { "s" }
    );
    if issues.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
