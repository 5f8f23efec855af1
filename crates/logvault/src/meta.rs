//! `vault.json`: what a vault is (VM, creation time, public key, format).
//! Written once when the vault is created, never rewritten.

use std::io::{Read, Write};
use std::path::Path;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::export::rfc3339;
use crate::format::{genesis_hash, hex, unhex, FORMAT_VERSION};
use crate::VaultError;

/// Contents of `vault.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultMeta {
    /// Format version of the vault files (1).
    pub format: u32,
    /// VM name (also the directory name).
    pub vm: String,
    /// Creation time, UTC nanoseconds since the epoch.
    pub created_ns: i64,
    /// The same time as RFC 3339, for people.
    pub created: String,
    /// Ed25519 public key of the checkpoints, hex.
    pub public_key: String,
    /// The chain's starting hash, hex (recomputed and compared on load).
    pub genesis: String,
}

impl VaultMeta {
    pub(crate) fn new(vm: &str, created_ns: i64, public_key: &[u8; 32]) -> VaultMeta {
        VaultMeta {
            format: FORMAT_VERSION,
            vm: vm.to_string(),
            created_ns,
            created: rfc3339(created_ns, 9),
            public_key: hex(public_key),
            genesis: hex(&genesis_hash(vm, created_ns, public_key)),
        }
    }

    /// The public key (checked to be a valid Ed25519 point on load).
    pub fn verifying_key(&self) -> VerifyingKey {
        // Checked by `load`; a `VaultMeta` built by `new` holds a real key.
        let bytes = unhex::<32>(&self.public_key).unwrap_or([0; 32]);
        VerifyingKey::from_bytes(&bytes).unwrap_or_default()
    }

    pub fn public_key_bytes(&self) -> [u8; 32] {
        unhex::<32>(&self.public_key).unwrap_or([0; 32])
    }

    pub fn genesis_bytes(&self) -> [u8; 32] {
        unhex::<32>(&self.genesis).unwrap_or([0; 32])
    }

    pub(crate) fn load(path: &Path, vm: &str) -> Result<VaultMeta, VaultError> {
        let bad = |problem: String| VaultError::Meta {
            path: path.into(),
            problem,
        };
        let file = std::fs::File::open(path).map_err(|e| VaultError::io("open", path, e))?;
        let mut text = Vec::new();
        file.take(64 * 1024)
            .read_to_end(&mut text)
            .map_err(|e| VaultError::io("read", path, e))?;
        let meta: VaultMeta =
            serde_json::from_slice(&text).map_err(|e| bad(format!("not vault JSON: {e}")))?;
        if meta.format != FORMAT_VERSION {
            return Err(bad(format!(
                "format {} (this vmwatch reads {FORMAT_VERSION})",
                meta.format
            )));
        }
        if meta.vm != vm {
            return Err(bad(format!("it names VM `{}`, not `{vm}`", meta.vm)));
        }
        let key = unhex::<32>(&meta.public_key)
            .ok_or_else(|| bad("public_key is not 64 hex digits".into()))?;
        VerifyingKey::from_bytes(&key)
            .map_err(|_| bad("public_key is not an Ed25519 public key".into()))?;
        if meta.genesis != hex(&genesis_hash(vm, meta.created_ns, &key)) {
            return Err(bad(
                "genesis does not match vm, created_ns and public_key".into()
            ));
        }
        if meta.created != rfc3339(meta.created_ns, 9) {
            return Err(bad("created does not match created_ns".into()));
        }
        Ok(meta)
    }

    /// Writes `vault.json` atomically (temporary file, sync, rename, sync dir).
    pub(crate) fn store(&self, dir: &Path) -> Result<(), VaultError> {
        let path = dir.join(crate::files::META);
        let tmp = dir.join(format!("{}.tmp", crate::files::META));
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| VaultError::Meta {
            path: path.clone(),
            problem: e.to_string(),
        })?;
        text.push(b'\n');
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| VaultError::io("write", &path, e))?;
        crate::files::sync_dir(dir)
    }
}
