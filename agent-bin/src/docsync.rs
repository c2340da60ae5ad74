//! Keeps generated tables in docs/operations.md in step with the code (tests only).

use std::sync::Mutex;

/// Serialises the tests that read and rewrite docs/operations.md.
static DOC_LOCK: Mutex<()> = Mutex::new(());

/// Asserts that the section between `<!-- {name}:start -->` and `<!-- {name}:end -->` of
/// docs/operations.md is `expected`; with `DEFENRA_UPDATE_DOCS` set, rewrites it instead.
pub(crate) fn check_operations_section(name: &str, expected: &str) {
    let _guard = DOC_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md");
    let doc = std::fs::read_to_string(path).expect("docs/operations.md exists");
    let (start, end) = (
        format!("<!-- {name}:start -->\n"),
        format!("<!-- {name}:end -->"),
    );
    let begin = doc
        .find(&start)
        .unwrap_or_else(|| panic!("{start:?} marker"))
        + start.len();
    let finish = doc.find(&end).unwrap_or_else(|| panic!("{end:?} marker"));
    if doc[begin..finish] == *expected {
        return;
    }
    if std::env::var_os("DEFENRA_UPDATE_DOCS").is_some() {
        std::fs::write(
            path,
            format!("{}{expected}{}", &doc[..begin], &doc[finish..]),
        )
        .unwrap();
    } else {
        panic!(
            "docs/operations.md's {name} table is stale; run DEFENRA_UPDATE_DOCS=1 cargo test -p defenra-agent"
        );
    }
}
