//! Picking kernel modules out of the kernel package for the initramfs.
//!
//! Debian's package ships the module tree but no `modules.dep` (depmod runs
//! at install time), and 6.12 compresses modules with XZ, which busybox's
//! `insmod`/`modprobe` cannot read. So we read each wanted module's
//! `.modinfo` `depends=` ourselves, follow the dependencies, decompress on the
//! host and write a `modules.dep` that busybox `modprobe` understands.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use object::read::elf::{FileHeader, SectionHeader};

use crate::error::{IoContext, LabError, Result};

/// One module placed in the image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Module {
    /// Name as the kernel knows it (`net_failover`).
    pub name: String,
    /// Path relative to `/lib/modules/<release>/`, uncompressed (`kernel/drivers/net/dummy.ko`).
    pub path: String,
    /// Names of the modules it needs loaded first.
    pub depends: Vec<String>,
}

/// Module names as the kernel compares them: `-` and `_` are the same.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Copies the `wanted` modules and their dependencies from the package tree
/// `src` (`.../lib/modules/<release>`) into `dst` (the image's
/// `/lib/modules/<release>`), decompressed, and writes `modules.dep`.
/// Modules built into this kernel are skipped; unknown names are an error.
pub fn install(src: &Path, dst: &Path, wanted: &[&str]) -> Result<Vec<Module>> {
    let mut index: HashMap<String, PathBuf> = HashMap::new();
    index_dir(src, &src.join("kernel"), &mut index)?;
    let builtin: BTreeSet<String> = std::fs::read_to_string(src.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .map(|f| normalize(f.trim_end_matches(".ko")))
        .collect();

    let mut placed: BTreeMap<String, Module> = BTreeMap::new();
    let mut queue: Vec<String> = wanted.iter().map(|w| normalize(w)).collect();
    while let Some(name) = queue.pop() {
        if placed.contains_key(&name) {
            continue;
        }
        let Some(rel) = index.get(&name) else {
            if builtin.contains(&name) {
                tracing::debug!("module {name} is built into this kernel");
                continue;
            }
            return Err(LabError::Invalid(format!(
                "kernel module `{name}` is neither in {} nor built in: remove it from the module list",
                src.display()
            )));
        };
        let bytes = read_module(&src.join(rel))?;
        let depends = modinfo_depends(&bytes).map_err(|e| LabError::BadFile {
            path: src.join(rel),
            detail: e,
        })?;
        let out_rel = strip_compression(rel);
        let out = dst.join(&out_rel);
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).at(parent)?;
        }
        std::fs::write(&out, &bytes).at(&out)?;
        queue.extend(depends.iter().cloned());
        placed.insert(
            name.clone(),
            Module {
                name,
                path: out_rel.to_string_lossy().into_owned(),
                depends,
            },
        );
    }

    // modules.dep: each module, then all its transitive dependencies ordered
    // so that loading from the end of the list satisfies every dependency.
    let mut dep = String::new();
    for m in placed.values() {
        let mut post = Vec::new();
        let mut seen = BTreeSet::new();
        visit(&m.name, &placed, &mut seen, &mut post);
        post.pop(); // the module itself comes last in post-order
        post.reverse();
        let deps: Vec<&str> = post
            .iter()
            .filter_map(|d| placed.get(d))
            .map(|d| d.path.as_str())
            .collect();
        dep.push_str(&format!(
            "{}:{}{}\n",
            m.path,
            if deps.is_empty() { "" } else { " " },
            deps.join(" ")
        ));
    }
    std::fs::create_dir_all(dst).at(dst)?;
    std::fs::write(dst.join("modules.dep"), dep).at(dst.join("modules.dep"))?;
    for f in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        if src.join(f).is_file() {
            std::fs::copy(src.join(f), dst.join(f)).at(dst.join(f))?;
        }
    }
    Ok(placed.into_values().collect())
}

fn visit(
    name: &str,
    all: &BTreeMap<String, Module>,
    seen: &mut BTreeSet<String>,
    post: &mut Vec<String>,
) {
    if !seen.insert(name.to_string()) {
        return;
    }
    if let Some(m) = all.get(name) {
        for d in &m.depends {
            visit(d, all, seen, post);
        }
    }
    post.push(name.to_string());
}

fn index_dir(root: &Path, dir: &Path, index: &mut HashMap<String, PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let path = entry.path();
        if entry.file_type().at(&path)?.is_dir() {
            index_dir(root, &path, index)?;
            continue;
        }
        let file = entry.file_name().to_string_lossy().into_owned();
        let stem = file
            .strip_suffix(".ko")
            .or_else(|| file.strip_suffix(".ko.xz"))
            .or_else(|| file.strip_suffix(".ko.zst"))
            .or_else(|| file.strip_suffix(".ko.gz"));
        if let Some(stem) = stem {
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            index.insert(normalize(stem), rel);
        }
    }
    Ok(())
}

fn strip_compression(rel: &Path) -> PathBuf {
    let s = rel.to_string_lossy();
    for ext in [".xz", ".zst", ".gz"] {
        if let Some(base) = s.strip_suffix(ext) {
            return PathBuf::from(base);
        }
    }
    rel.to_path_buf()
}

/// Reads a module file, decompressing `.ko.xz`.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).at(path)?;
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        let mut out = Vec::new();
        liblzma::read::XzDecoder::new(&raw[..])
            .take(256 << 20)
            .read_to_end(&mut out)
            .map_err(|e| LabError::BadFile {
                path: path.into(),
                detail: format!("xz: {e}"),
            })?;
        Ok(out)
    } else if name.ends_with(".zst") || name.ends_with(".gz") {
        Err(LabError::BadFile {
            path: path.into(),
            detail: "zstd/gzip-compressed modules are not supported yet (Debian uses xz)".into(),
        })
    } else {
        Ok(raw)
    }
}

/// The `depends=` list of a module's `.modinfo` section.
pub fn modinfo_depends(ko: &[u8]) -> Result<Vec<String>, String> {
    let header = object::elf::FileHeader64::<object::Endianness>::parse(ko)
        .map_err(|e| format!("not an ELF module: {e}"))?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    let sections = header.sections(endian, ko).map_err(|e| e.to_string())?;
    let Some((_, modinfo)) = sections.section_by_name(endian, b".modinfo") else {
        return Err("no .modinfo section".into());
    };
    let data = modinfo.data(endian, ko).map_err(|e| e.to_string())?;
    Ok(data
        .split(|&b| b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(normalize)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect())
}
