//! `cargo xtask tidy`: every crate root and every module opens with a `//!` doc comment.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::project_root;

pub(crate) fn run() -> anyhow::Result<()> {
    let root = project_root();
    let mut files = Vec::new();
    for dir in [
        "crates",
        "agent-bin/src",
        "xtask/src",
        "fuzz/src",
        "fuzz/fuzz_targets",
    ] {
        collect_rust_files(&root.join(dir), &mut files)?;
    }
    let mut missing = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&root).unwrap_or(file);
        let in_src = relative
            .components()
            .any(|part| part.as_os_str() == "src" || part.as_os_str() == "fuzz_targets");
        // Test modules (`tests.rs`, `tests/`) and integration tests are exempt.
        let is_test = relative
            .components()
            .any(|part| part.as_os_str() == "tests")
            || file.file_name().is_some_and(|name| name == "tests.rs");
        if !in_src || is_test {
            continue;
        }
        let text =
            fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        if !text.trim_start().starts_with("//!") {
            missing.push(relative.display().to_string());
        }
    }
    if !missing.is_empty() {
        anyhow::bail!(
            "these files do not open with a `//!` doc comment:\n  {}",
            missing.join("\n  ")
        );
    }
    eprintln!("tidy: {} source files checked", files.len());
    Ok(())
}

fn collect_rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|name| name == "target") {
                continue;
            }
            collect_rust_files(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
    Ok(())
}
