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

    /// Reads the saved document, if there is one.
    ///
    /// # Errors
    ///
    /// Any I/O error other than the file not existing.
    pub fn load(&self) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.last_good_path()) {
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
}
