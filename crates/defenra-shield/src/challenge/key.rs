//! The shield key (32 random bytes, in a file of the state dir or one given by the
//! operator) and the [`KeyRing`] that signs with the current key and still accepts the
//! previous one for a grace time after a rotation.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ring::rand::SecureRandom;
use ring::{digest, hmac};

use super::{CHALLENGE_TTL, Rejection};

/// Bytes of key material.
const KEY_LEN: usize = 32;
/// A key file is 64 hex digits and a newline (or 32 raw bytes); anything past this is not one.
const MAX_KEY_FILE: u64 = 1024;
/// Mixed into the hash a key's id and fingerprint come from, so they say nothing about any
/// other use of the key.
const ID_LABEL: &[u8] = b"defenra shield key id\0";

/// The secret every challenge and clearance is signed with. Its `Debug` shows only the
/// fingerprint; the bytes never leave this type except into the HMAC key.
#[derive(Clone)]
pub struct ShieldKey {
    bytes: [u8; KEY_LEN],
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    #[error("cannot use shield key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("shield key file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error(
        "shield key file {path} has mode {mode:03o}: group or others may use it; \
         run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "shield key file {path} is not a key: it must hold 64 hex digits \
         (`openssl rand -hex 32`) or exactly 32 bytes, not all zero"
    )]
    Format { path: PathBuf },
    #[error("the system's random number generator failed")]
    Random,
}

impl ShieldKey {
    /// A new random key from the operating system's generator.
    ///
    /// # Errors
    ///
    /// [`KeyFileError::Random`] when the generator fails (it does not on Linux once booted).
    pub fn generate() -> Result<ShieldKey, KeyFileError> {
        let mut bytes = [0; KEY_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| KeyFileError::Random)?;
        Ok(ShieldKey { bytes })
    }

    /// A key from its bytes (tests, and fleets that distribute keys another way).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> ShieldKey {
        ShieldKey { bytes }
    }

    /// Reads the key in `path`, or creates it when the file does not exist: 32 random
    /// bytes written as 64 hex digits and a newline, mode 0600, through a temporary file
    /// that is hard-linked into place, so a crash never leaves a partial key and two
    /// agents starting at once end up with the same one.
    ///
    /// # Errors
    ///
    /// As [`ShieldKey::read`] for an existing file; the I/O error of creating one.
    pub fn load_or_create(path: &Path) -> Result<ShieldKey, KeyFileError> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => return ShieldKey::read(path),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(KeyFileError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        }
        let key = ShieldKey::generate()?;
        match key.create(path) {
            Ok(()) => Ok(key),
            // Another process created it between our look and our link: use theirs.
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                ShieldKey::read(path)
            }
            Err(source) => Err(KeyFileError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Reads the key in `path` (the state dir's, or `--shield-key-file`): 64 hex digits
    /// with optional surrounding whitespace, or exactly 32 raw bytes. The file must be
    /// private to its owner (no group or other permission bits), as ssh demands of a
    /// private key: whoever reads it can mint clearances for any address.
    ///
    /// # Errors
    ///
    /// [`KeyFileError`] naming the path: missing or unreadable, not a regular file, group
    /// or other permissions, or contents that are not a key (an all-zero key included).
    pub fn read(path: &Path) -> Result<ShieldKey, KeyFileError> {
        let io = |source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        };
        let metadata = std::fs::metadata(path).map_err(io)?;
        if !metadata.is_file() {
            return Err(KeyFileError::NotAFile {
                path: path.to_owned(),
            });
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyFileError::Permissions {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        let mut contents = Vec::new();
        std::fs::File::open(path)
            .map_err(io)?
            .take(MAX_KEY_FILE + 1)
            .read_to_end(&mut contents)
            .map_err(io)?;
        parse(&contents).ok_or_else(|| KeyFileError::Format {
            path: path.to_owned(),
        })
    }

    /// The key as 64 lower-case hex digits: the secret itself, for a fleet's shared store
    /// (`defenra-fleet` keeps it in Redis). Never log it; log the fingerprint.
    pub fn to_hex(&self) -> String {
        let mut text = String::with_capacity(2 * KEY_LEN);
        for byte in self.bytes {
            text.push(char::from(HEX[usize::from(byte >> 4)]));
            text.push(char::from(HEX[usize::from(byte & 15)]));
        }
        text
    }

    /// A key from the contents of a key file or a fleet store: 64 hex digits (surrounding
    /// whitespace ignored) or exactly 32 bytes, not all zero; `None` otherwise.
    pub fn from_text(contents: &[u8]) -> Option<ShieldKey> {
        parse(contents)
    }

    /// Writes the key to `path` (64 hex digits and a newline, mode 0600), replacing what is
    /// there atomically: a temporary file renamed into place. For a key file the agent
    /// owns (the state directory's), when the fleet's key replaces it; never for an
    /// operator's file.
    ///
    /// # Errors
    ///
    /// The I/O error of writing or renaming.
    pub fn replace_file(&self, path: &Path) -> std::io::Result<()> {
        let temporary = temporary_name(path);
        let written = (|| {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&temporary)?;
            file.write_all(format!("{}\n", self.to_hex()).as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temporary, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written
    }

    /// A short public name of the key for logs: the first 4 bytes of a hash of it, in hex.
    pub fn fingerprint(&self) -> Fingerprint {
        let digest = self.id_digest();
        Fingerprint([digest[0], digest[1], digest[2], digest[3]])
    }

    fn id_digest(&self) -> [u8; 32] {
        let mut context = digest::Context::new(&digest::SHA256);
        context.update(ID_LABEL);
        context.update(&self.bytes);
        let mut out = [0; 32];
        out.copy_from_slice(context.finish().as_ref());
        out
    }

    fn create(&self, path: &Path) -> std::io::Result<()> {
        let temporary = temporary_name(path);
        let written = (|| {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&temporary)?;
            let mut text = [0u8; 2 * KEY_LEN + 1];
            for (pair, byte) in text.chunks_exact_mut(2).zip(self.bytes) {
                pair[0] = HEX[usize::from(byte >> 4)];
                pair[1] = HEX[usize::from(byte & 15)];
            }
            text[2 * KEY_LEN] = b'\n';
            file.write_all(&text)?;
            file.sync_all()?;
            // A link, not a rename: it fails rather than replace a key another process made.
            std::fs::hard_link(&temporary, path)
        })();
        let _ = std::fs::remove_file(&temporary);
        written?;
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            // Make the new name durable; a failure here loses nothing but durability.
            let _ = std::fs::File::open(dir).and_then(|dir| dir.sync_all());
        }
        Ok(())
    }
}

impl fmt::Debug for ShieldKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShieldKey")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// The public name of a key: 8 hex digits, safe to log.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 4]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The keys challenges and clearances are checked against: the current one, which also
/// signs, and the one before it until its grace time ends. Immutable: a rotation builds a
/// new ring, which the caller swaps in (an `ArcSwap` beside the other compiled state).
#[derive(Clone)]
pub struct KeyRing {
    current: SigningKey,
    previous: Option<Retired>,
}

#[derive(Clone)]
struct Retired {
    key: SigningKey,
    /// Unix second from which the retired key is refused.
    accept_until: u64,
}

#[derive(Clone)]
pub(super) struct SigningKey {
    /// Carried in every token so verification picks its key without trying each.
    pub(super) id: [u8; 2],
    /// A hash of the key: tells "the same key" apart on a reload, and names it in logs.
    digest: [u8; 32],
    pub(super) hmac: hmac::Key,
}

impl SigningKey {
    fn new(key: &ShieldKey) -> SigningKey {
        let digest = key.id_digest();
        SigningKey {
            id: [digest[0], digest[1]],
            digest,
            hmac: hmac::Key::new(hmac::HMAC_SHA256, &key.bytes),
        }
    }

    fn fingerprint(&self) -> Fingerprint {
        Fingerprint([
            self.digest[0],
            self.digest[1],
            self.digest[2],
            self.digest[3],
        ])
    }
}

impl KeyRing {
    /// A ring of one key.
    pub fn new(key: &ShieldKey) -> KeyRing {
        KeyRing {
            current: SigningKey::new(key),
            previous: None,
        }
    }

    /// The ring after `new` became the current key at Unix second `now`: the old current
    /// key is still accepted for `accept_previous_for` (at least [`CHALLENGE_TTL`], so
    /// challenges in flight stay solvable; pass the longest clearance TTL of the config so
    /// every cookie issued before the rotation lives out its life), and the key before it
    /// is dropped. Rotating to the key already current changes nothing, so re-reading an
    /// unchanged key file on every reload is harmless.
    pub fn rotate(&self, new: &ShieldKey, now: u64, accept_previous_for: Duration) -> KeyRing {
        let new = SigningKey::new(new);
        if new.digest == self.current.digest {
            return self.clone();
        }
        let grace = accept_previous_for.max(CHALLENGE_TTL).as_secs();
        KeyRing {
            current: new,
            previous: Some(Retired {
                key: self.current.clone(),
                accept_until: now.saturating_add(grace),
            }),
        }
    }

    /// The fingerprint of the signing key.
    pub fn current(&self) -> Fingerprint {
        self.current.fingerprint()
    }

    /// The fingerprint of the previous key and the Unix second its grace time ends.
    pub fn previous(&self) -> Option<(Fingerprint, u64)> {
        self.previous
            .as_ref()
            .map(|retired| (retired.key.fingerprint(), retired.accept_until))
    }

    pub(super) fn signing_key(&self) -> &SigningKey {
        &self.current
    }

    /// Checks `tag` over `message` with the key named `id`: the current one, or the
    /// previous one within its grace time (both, in that order, in the rare case that
    /// their ids are equal). One HMAC, compared in constant time by ring.
    pub(super) fn verify(
        &self,
        id: [u8; 2],
        now: u64,
        message: &[u8],
        tag: &[u8],
    ) -> Result<(), Rejection> {
        let previous = self
            .previous
            .as_ref()
            .filter(|retired| retired.key.id == id && now < retired.accept_until)
            .map(|retired| &retired.key);
        let current = (self.current.id == id).then_some(&self.current);
        if current.is_none() && previous.is_none() {
            return Err(Rejection::Foreign);
        }
        for key in current.into_iter().chain(previous) {
            if hmac::verify(&key.hmac, message, tag).is_ok() {
                return Ok(());
            }
        }
        Err(Rejection::Bad)
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("current", &self.current())
            .field("previous", &self.previous())
            .finish()
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `.NAME.PID.tmp` beside `path`.
fn temporary_name(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// 32 raw bytes, or 64 hex digits with surrounding whitespace; never the all-zero key.
fn parse(contents: &[u8]) -> Option<ShieldKey> {
    let mut bytes = [0; KEY_LEN];
    if contents.len() == KEY_LEN {
        bytes.copy_from_slice(contents);
    } else {
        let text = contents.trim_ascii();
        if text.len() != 2 * KEY_LEN {
            return None;
        }
        for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            *byte = hex_digit(pair[0])? << 4 | hex_digit(pair[1])?;
        }
    }
    (bytes != [0; KEY_LEN]).then_some(ShieldKey { bytes })
}

fn hex_digit(char: u8) -> Option<u8> {
    match char {
        b'0'..=b'9' => Some(char - b'0'),
        b'a'..=b'f' => Some(char - b'a' + 10),
        b'A'..=b'F' => Some(char - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn a_missing_key_is_created_private_and_read_back_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shield.key");
        let created = ShieldKey::load_or_create(&path).expect("created");
        assert_eq!(mode(&path), 0o600);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.len(), 65, "{text:?}");
        assert!(text.ends_with('\n'));
        let again = ShieldKey::load_or_create(&path).expect("read back");
        assert_eq!(again.bytes, created.bytes);
        assert_eq!(again.fingerprint(), created.fingerprint());
        // Nothing but the key is left in the directory.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("shield.key")]);
        // A second generated key differs (32 random bytes each).
        let other = ShieldKey::load_or_create(&dir.path().join("other.key")).expect("other");
        assert_ne!(other.bytes, created.bytes);
    }

    #[test]
    fn a_key_goes_to_text_and_back_and_replaces_a_file_privately() {
        let key = ShieldKey::generate().expect("random");
        let text = key.to_hex();
        assert_eq!(text.len(), 64);
        let back = ShieldKey::from_text(text.as_bytes()).expect("parses");
        assert_eq!(back.bytes, key.bytes);
        assert!(ShieldKey::from_text(b"not a key").is_none());
        assert!(ShieldKey::from_text("0".repeat(64).as_bytes()).is_none());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shield.key");
        ShieldKey::load_or_create(&path).expect("created");
        key.replace_file(&path).expect("replaced");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(ShieldKey::read(&path).expect("read").bytes, key.bytes);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("shield.key")]);
    }

    #[test]
    fn a_key_file_others_may_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fleet.key");
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).expect("write");
        for loose in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(loose)).expect("chmod");
            let error = ShieldKey::read(&path).expect_err("loose mode refused");
            assert!(matches!(error, KeyFileError::Permissions { mode, .. } if mode == loose));
            assert!(error.to_string().contains("chmod 600"), "{error}");
            // load_or_create never replaces an existing key either.
            assert!(ShieldKey::load_or_create(&path).is_err());
        }
        for private in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(private))
                .expect("chmod");
            let key = ShieldKey::read(&path).expect("private key accepted");
            assert_eq!(key.bytes, [0xab; 32]);
        }
    }

    #[test]
    fn key_files_hold_hex_or_raw_bytes_and_nothing_else() {
        assert_eq!(
            parse(format!("  {}\r\n", "0F".repeat(32)).as_bytes()).map(|key| key.bytes),
            Some([0x0f; 32])
        );
        assert_eq!(parse(&[7; 32]).map(|key| key.bytes), Some([7; 32]));
        for bad in [
            "ab".repeat(31),
            "ab".repeat(33),
            format!("{}zz", "ab".repeat(31)),
            "00".repeat(32),
            String::new(),
        ] {
            assert!(parse(bad.as_bytes()).is_none(), "{bad:?}");
        }
        assert!(parse(&[0; 32]).is_none(), "all-zero raw key");
        assert!(parse(&[7; 33]).is_none());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("short.key");
        std::fs::write(&path, "abc").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(
            ShieldKey::read(&path),
            Err(KeyFileError::Format { .. })
        ));
        assert!(matches!(
            ShieldKey::read(dir.path()),
            Err(KeyFileError::NotAFile { .. })
        ));
        assert!(matches!(
            ShieldKey::read(&dir.path().join("missing")),
            Err(KeyFileError::Io { .. })
        ));
    }

    #[test]
    fn debug_output_never_shows_key_material() {
        let key = ShieldKey::from_bytes([0x5a; 32]);
        let ring = KeyRing::new(&key).rotate(&ShieldKey::from_bytes([0xa5; 32]), 0, CHALLENGE_TTL);
        for text in [
            format!("{key:?}"),
            format!("{ring:?}"),
            format!("{ring:#?}"),
        ] {
            assert!(!text.to_lowercase().contains("5a5a"), "{text}");
            assert!(!text.to_lowercase().contains("a5a5"), "{text}");
            assert!(!text.contains("90, 90"), "{text}");
        }
        assert!(format!("{key:?}").contains(&key.fingerprint().to_string()));
    }

    #[test]
    fn rotation_keeps_the_previous_key_for_its_grace_time_only() {
        let first = ShieldKey::from_bytes([1; 32]);
        let second = ShieldKey::from_bytes([2; 32]);
        let ring = KeyRing::new(&first);
        assert_eq!(ring.previous(), None);
        // Re-reading the same key changes nothing.
        let same = ring.rotate(&first, 1000, Duration::from_secs(900));
        assert_eq!(same.current(), first.fingerprint());
        assert_eq!(same.previous(), None);
        let rotated = ring.rotate(&second, 1000, Duration::from_secs(900));
        assert_eq!(rotated.current(), second.fingerprint());
        assert_eq!(rotated.previous(), Some((first.fingerprint(), 1900)));
        // The grace time is never shorter than a challenge's life.
        let short = ring.rotate(&second, 1000, Duration::from_secs(10));
        assert_eq!(short.previous(), Some((first.fingerprint(), 1300)));
        // The key before the previous one is dropped.
        let third = ShieldKey::from_bytes([3; 32]);
        let twice = rotated.rotate(&third, 1100, Duration::from_secs(900));
        assert_eq!(twice.previous(), Some((second.fingerprint(), 2000)));
    }
}
