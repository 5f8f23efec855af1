//! The daemon's Ed25519 checkpoint key.
//!
//! One key signs the checkpoints of every vault the daemon writes. Its
//! public half is copied into each vault's `vault.json` when the vault is
//! created, and `verify` uses that copy, so verifying never needs the
//! secret. Policy when the key changes: a vault keeps the key it was created
//! with. A malformed key file is an error (never silently replaced: the old
//! key may be restorable from a backup, and a new key cannot append to the
//! existing vaults); deleting the file makes a new key on the next start,
//! which then serves only vaults created after that (existing vaults must be
//! moved aside to get a new one; [`crate::Vault::open`] says so).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

use crate::format::{hex, unhex};
use crate::VaultError;

/// The checkpoint signing key.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
}

impl std::fmt::Debug for Signer {
    // Never print the secret half.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("public_key", &self.public_key_hex())
            .finish()
    }
}

impl Signer {
    /// A signer from a fixed 32-byte seed (tests, fuzzing, keys kept elsewhere).
    pub fn from_seed(seed: [u8; 32]) -> Signer {
        Signer {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// A new random key from the operating system, not saved anywhere.
    pub fn generate() -> Result<Signer, VaultError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| VaultError::KeyFile {
            path: "(new key)".into(),
            problem: format!("cannot be generated: the OS random source failed ({e})"),
        })?;
        Ok(Signer::from_seed(seed))
    }

    /// Loads the key from `path` (one line: 64 hex digits of the Ed25519
    /// seed), or creates it with mode 0600 when the file does not exist.
    /// The file must not be readable by group or others.
    pub fn load_or_create(path: &Path) -> Result<Signer, VaultError> {
        match File::open(path) {
            Ok(file) => Signer::load(path, file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Signer::create(path),
            Err(e) => Err(VaultError::io("open key file", path, e)),
        }
    }

    fn load(path: &Path, file: File) -> Result<Signer, VaultError> {
        let meta = file
            .metadata()
            .map_err(|e| VaultError::io("stat key file", path, e))?;
        if !meta.is_file() {
            return Err(VaultError::KeyFile {
                path: path.into(),
                problem: "is not a regular file".into(),
            });
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(VaultError::KeyPermissions {
                path: path.into(),
                mode,
            });
        }
        let mut text = String::new();
        // 64 hex digits and a newline; read a little more to notice junk.
        file.take(256)
            .read_to_string(&mut text)
            .map_err(|_| VaultError::KeyFile {
                path: path.into(),
                problem: "is not text".into(),
            })?;
        let seed = unhex::<32>(text.trim_end_matches('\n')).ok_or_else(|| VaultError::KeyFile {
            path: path.into(),
            problem: "is not one line of 64 hex digits".into(),
        })?;
        Ok(Signer::from_seed(seed))
    }

    fn create(path: &Path) -> Result<Signer, VaultError> {
        let signer = Signer::generate()?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).map_err(|e| VaultError::io("create directory", dir, e))?;
        // Write a temporary file, then hard-link it into place: the link
        // fails if another process created the key meanwhile (we then use
        // theirs), and the key file never exists half-written.
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp_name);
        let _ = std::fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(format!("{}\n", hex(signer.key.as_bytes())).as_bytes())?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(VaultError::io("write key file", &tmp, e));
        }
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                crate::files::sync_dir(dir)?;
                tracing::info!(path = %path.display(), public_key = %signer.public_key_hex(), "created a new log vault signing key");
                Ok(signer)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let file =
                    File::open(path).map_err(|e| VaultError::io("open key file", path, e))?;
                Signer::load(path, file)
            }
            Err(e) => Err(VaultError::io("create key file", path, e)),
        }
    }

    /// The public key, as stored in `vault.json`.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    pub fn public_key_hex(&self) -> String {
        hex(&self.public_key())
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub(crate) fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_load_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/vault.key");
        let a = Signer::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Signer::load_or_create(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert!(!format!("{a:?}").contains(&hex(a.key.as_bytes())));
    }

    #[test]
    fn malformed_key_is_an_error_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.key");
        std::fs::write(&path, "not a key\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = Signer::load_or_create(&path).unwrap_err().to_string();
        assert!(
            err.contains("restore it from a backup, or delete it"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a key\n");
    }

    #[test]
    fn readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.key");
        Signer::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Signer::load_or_create(&path).unwrap_err();
        assert!(matches!(err, VaultError::KeyPermissions { .. }), "{err}");
    }
}
