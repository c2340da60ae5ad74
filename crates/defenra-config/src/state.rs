//! The last good configuration document, kept under `--state-dir` so a restart during a
//! Core outage still serves something.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The state directory. Only the config task writes to it.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

const LAST_GOOD: &str = "last-good.json";

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }

    /// The file holding the last good document.
    pub fn last_good_path(&self) -> PathBuf {
        self.dir.join(LAST_GOOD)
    }

    /// Saves `doc` atomically: write a temporary file, fsync it, rename it over the old
    /// one, fsync the directory. A crash at any point leaves either the old or the new
    /// document, never a torn one.
    ///
    /// # Errors
    ///
    /// Any I/O error; the previous file is then untouched.
    pub fn save(&self, doc: &[u8]) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let temporary = self.dir.join(format!(".{LAST_GOOD}.tmp"));
        {
            let mut file = File::create(&temporary)?;
            file.write_all(doc)?;
            file.sync_all()?;
        }
        fs::rename(&temporary, self.last_good_path())?;
        sync_dir(&self.dir)
    }

    /// Reads the saved document, if there is one: a regular file of at most
    /// [`MAX_DOCUMENT_BYTES`](crate::MAX_DOCUMENT_BYTES) (see [`crate::read_document`]).
    ///
    /// # Errors
    ///
    /// Any I/O error other than the file not existing; a file that is not regular or too
    /// large is an `InvalidInput` error.
    pub fn load(&self) -> io::Result<Option<Vec<u8>>> {
        match crate::read_document(&self.last_good_path(), crate::MAX_DOCUMENT_BYTES) {
            Ok(doc) => Ok(Some(doc)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    // Directories can be opened read-only and fsynced on Unix; elsewhere this is a no-op.
    match File::open(dir) {
        Ok(handle) => handle.sync_all().or(Ok(())),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_replaces_the_document_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("nested"));
        assert_eq!(state.load().unwrap(), None);
        state.save(b"{\"a\":1}").unwrap();
        state.save(b"{\"a\":2}").unwrap();
        assert_eq!(state.load().unwrap().as_deref(), Some(&b"{\"a\":2}"[..]));
        let names: Vec<_> = fs::read_dir(dir.path().join("nested"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![LAST_GOOD.to_owned()]);
    }

    #[test]
    fn a_state_file_that_is_not_regular_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        // A FIFO would block a plain read until a writer came (issue 17 finding 12).
        let made = std::process::Command::new("mkfifo")
            .arg(state.last_good_path())
            .status()
            .unwrap();
        assert!(made.success());
        let error = state.load().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(error.to_string().contains("FIFO"), "{error}");
    }
}
