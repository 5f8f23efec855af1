//! Resolving and downloading Debian packages with the host's own apt.
//!
//! We ask `apt-cache show --no-all-versions` for candidate versions (so the
//! host's sources and pins decide, exactly as `apt-get install` would) and
//! fetch with `apt-get download name=version`, which needs no root and
//! installs nothing.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{LabError, Result};
use crate::util::run_capture;

/// One package version as apt describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub arch: String,
    /// `Pre-Depends` then `Depends`; each entry lists alternatives (`a | b`).
    pub depends: Vec<Vec<String>>,
}

impl Package {
    /// The file name `apt-get download` gives this package (epoch `:` → `%3a`).
    pub fn deb_file_name(&self) -> String {
        format!(
            "{}_{}_{}.deb",
            self.name,
            self.version.replace(':', "%3a"),
            self.arch
        )
    }
}

/// Where `apt-cache` keeps its binary package cache for us. Debian's
/// container images disable apt's own (`Dir::Cache::pkgcache ""`), which
/// makes every `apt-cache` call re-parse all package lists (~1.2 s instead
/// of ~0.25 s); apt revalidates this cache against the lists itself.
static PKGCACHE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Sets the directory for apt's package cache (once per process).
pub fn use_cache_dir(dir: &Path) {
    if std::fs::create_dir_all(dir).is_ok() {
        let _ = PKGCACHE.set(dir.to_path_buf());
    }
}

fn apt_cache(default_release: Option<&str>) -> Command {
    let mut cmd = Command::new("apt-cache");
    if let Some(dir) = PKGCACHE.get() {
        cmd.arg("-o").arg(format!(
            "Dir::Cache::pkgcache={}",
            dir.join("pkgcache.bin").display()
        ));
        cmd.arg("-o").arg(format!(
            "Dir::Cache::srcpkgcache={}",
            dir.join("srcpkgcache.bin").display()
        ));
    }
    if let Some(rel) = default_release {
        cmd.arg("-o").arg(format!("APT::Default-Release={rel}"));
    }
    cmd
}

/// Candidate versions of `names` (with `default_release` as the preferred
/// suite). Names apt does not know (or that are purely virtual) are absent
/// from the result.
pub fn show(names: &[String], default_release: Option<&str>) -> Result<BTreeMap<String, Package>> {
    if names.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut cmd = apt_cache(default_release);
    cmd.args(["show", "--no-all-versions"]).args(names);
    // apt-cache exits non-zero if any name is virtual or unknown but still
    // prints the others; parse what it printed.
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| LabError::Command {
            command: "apt-cache show".into(),
            detail: e.to_string(),
        })?;
    Ok(parse_stanzas(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .map(|p| (p.name.clone(), p))
        .collect())
}

/// Parses `apt-cache show` output (RFC 822 stanzas).
pub fn parse_stanzas(text: &str) -> Vec<Package> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: BTreeMap<&str, String> = BTreeMap::new();
        let mut last: Option<&str> = None;
        for line in stanza.lines() {
            if line.starts_with(' ') || line.starts_with('\t') {
                if let Some(k) = last {
                    if let Some(v) = fields.get_mut(k) {
                        v.push(' ');
                        v.push_str(line.trim());
                    }
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                fields.insert(k, v.trim().to_string());
                last = Some(k);
            }
        }
        let (Some(name), Some(version)) = (fields.get("Package"), fields.get("Version")) else {
            continue;
        };
        let mut depends = Vec::new();
        for key in ["Pre-Depends", "Depends"] {
            if let Some(v) = fields.get(key) {
                depends.extend(parse_depends(v));
            }
        }
        out.push(Package {
            name: name.clone(),
            version: version.clone(),
            arch: fields
                .get("Architecture")
                .cloned()
                .unwrap_or_else(|| "amd64".into()),
            depends,
        });
    }
    out
}

/// `a (>= 1) | b, c:any` → `[[a, b], [c]]`.
pub fn parse_depends(field: &str) -> Vec<Vec<String>> {
    field
        .split(',')
        .map(|group| {
            group
                .split('|')
                .filter_map(|alt| {
                    let name = alt.trim().split([' ', '(', '[']).next()?.trim();
                    let name = name.split(':').next()?;
                    (!name.is_empty()).then(|| name.to_string())
                })
                .collect::<Vec<_>>()
        })
        .filter(|g| !g.is_empty())
        .collect()
}

/// The concrete kernel image package a metapackage (`linux-image-amd64`)
/// points at, in the given suite.
/// `hint` (the image package of the last build) is asked for in the same
/// apt-cache call, which saves a call when it is still current.
pub fn resolve_kernel(
    meta: &str,
    default_release: Option<&str>,
    hint: Option<&str>,
) -> Result<Package> {
    let mut names = vec![meta.to_string()];
    names.extend(hint.map(str::to_string));
    let metas = show(&names, default_release)?;
    let m = metas
        .get(meta)
        .ok_or_else(|| LabError::Apt(format!("package `{meta}` not found")))?;
    let image = m
        .depends
        .iter()
        .flatten()
        .find(|d| d.starts_with("linux-image-"))
        .ok_or_else(|| {
            LabError::Apt(format!(
                "`{meta}` {} depends on no linux-image-* package",
                m.version
            ))
        })?
        .clone();
    if let Some(p) = metas.get(&image) {
        return Ok(p.clone());
    }
    let found = show(std::slice::from_ref(&image), default_release)?;
    found.get(&image).cloned().ok_or_else(|| {
        LabError::Apt(format!(
            "kernel package `{image}` (from `{meta}`) not found"
        ))
    })
}

/// The packages in `roots` plus, transitively, the library packages (names
/// starting with `lib`) they depend on. Non-library dependencies (base-files,
/// dpkg, debconf...) are what a real installation needs, not what running the
/// binaries needs; the DT_NEEDED check after assembly proves the set complete.
///
/// `hint` (the closure of the last build) is fetched in the first apt-cache
/// call, so an unchanged closure costs one call; hinted packages only enter
/// the result if the walk reaches them.
pub fn library_closure(roots: &[&str], hint: &[String]) -> Result<BTreeMap<String, Package>> {
    let mut done: BTreeMap<String, Package> = BTreeMap::new();
    let mut queue: VecDeque<String> = roots.iter().map(|s| s.to_string()).collect();
    let mut asked: std::collections::BTreeSet<String> = queue.iter().cloned().collect();
    let mut first: Vec<String> = queue.iter().cloned().collect();
    first.extend(hint.iter().filter(|h| !asked.contains(*h)).cloned());
    let mut known = show(&first, None)?;
    let mut queried: std::collections::BTreeSet<String> = first.into_iter().collect();
    while !queue.is_empty() {
        let batch: Vec<String> = queue.drain(..).collect();
        let unknown: Vec<String> = batch
            .iter()
            .filter(|n| !queried.contains(*n))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            known.extend(show(&unknown, None)?);
            queried.extend(unknown);
        }
        for name in &batch {
            let Some(pkg) = known.get(name) else {
                if roots.contains(&name.as_str()) {
                    return Err(LabError::Apt(format!("package `{name}` not found")));
                }
                tracing::debug!("dependency `{name}` is virtual or unknown; skipped");
                continue;
            };
            for group in &pkg.depends {
                // The first alternative apt knows about wins; others are skipped.
                let Some(dep) = group.first() else { continue };
                if dep.starts_with("lib") && asked.insert(dep.clone()) {
                    queue.push_back(dep.clone());
                }
            }
            done.insert(name.clone(), pkg.clone());
        }
    }
    Ok(done)
}

/// Makes sure `dir` holds the `.deb` of every package, downloading the
/// missing ones in one `apt-get download` call. Returns their paths.
pub fn download(pkgs: &[&Package], dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| LabError::io(dir, e))?;
    let missing: Vec<&&Package> = pkgs
        .iter()
        .filter(|p| !dir.join(p.deb_file_name()).is_file())
        .collect();
    if !missing.is_empty() {
        tracing::info!(
            "downloading {} package(s) into {}",
            missing.len(),
            dir.display()
        );
        let mut cmd = Command::new("apt-get");
        cmd.current_dir(dir).arg("download").arg("-q");
        // As root, apt drops privileges to `_apt` for downloads and warns when
        // that user cannot write here; downloading as root is what we want.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        cmd.args(missing.iter().map(|p| format!("{}={}", p.name, p.version)));
        run_capture(&mut cmd)?;
    }
    let mut out = BTreeMap::new();
    for p in pkgs {
        let path = dir.join(p.deb_file_name());
        if !path.is_file() {
            return Err(LabError::Apt(format!(
                "apt-get download did not produce {}",
                path.display()
            )));
        }
        out.insert(p.name.clone(), path);
    }
    Ok(out)
}

/// Unpacks a `.deb`'s files into `dest` (no maintainer scripts run).
pub fn extract(deb: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(|e| LabError::io(dest, e))?;
    run_capture(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stanzas_and_depends() {
        let text = "Package: coreutils\nVersion: 9.1-1\nArchitecture: amd64\n\
            Pre-Depends: libacl1 (>= 2.2.23), libc6 (>= 2.34)\n\
            Description: GNU core\n utilities\n\n\
            Package: gzip\nVersion: 1:1.12-1\nArchitecture: amd64\n\
            Depends: dpkg (>= 1.15.4) | install-info, libfoo:any\n";
        let p = parse_stanzas(text);
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0].depends,
            vec![vec!["libacl1".to_string()], vec!["libc6".to_string()]]
        );
        assert_eq!(
            p[1].depends[0],
            vec!["dpkg".to_string(), "install-info".to_string()]
        );
        assert_eq!(p[1].depends[1], vec!["libfoo".to_string()]);
        assert_eq!(p[1].deb_file_name(), "gzip_1%3a1.12-1_amd64.deb");
    }
}
