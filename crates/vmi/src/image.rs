//! The guest's kernel image on the host: an ELF `vmlinux`.
//!
//! vmwatch never asks the guest what its kernel looks like; everything about
//! the kernel's code and data layout (kallsyms tables, `.BTF`, `.rodata`)
//! comes from the image the VM was booted from. Debian ships the kernel as a
//! compressed bzImage (`vmlinuz`); [`extract_vmlinux`] turns that into the
//! ELF `vmlinux` that [`KernelImage`] reads.
//!
//! The image is treated as untrusted input: every offset and size read from
//! it is checked against the bytes we actually have, and nothing here panics
//! on malformed data.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use object::read::elf::{ElfFile64, ProgramHeader as _};
use object::{Endianness, Object, ObjectSection};

/// ELF magic bytes, used to check decompressed payloads.
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Upper bound on a decompressed kernel, so a crafted payload cannot make us
/// allocate without limit (Debian's vmlinux is ~60 MiB; debug builds reach a
/// few hundred MiB).
pub const MAX_DECOMPRESSED_LEN: u64 = 1 << 30;

/// Why a kernel image could not be opened or extracted.
///
/// Each message is one line saying what is wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("cannot read kernel image {path}: {source}: check the path and its permissions")]
    Io {
        /// The path we tried to read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The bytes are not an ELF file at all.
    #[error("kernel image is not an ELF file: pass the uncompressed vmlinux (a bzImage/vmlinuz can be unpacked with extract_vmlinux)")]
    NotElf,
    /// The bytes start like an ELF file but cannot be parsed as a 64-bit one.
    #[error("kernel image is not a valid 64-bit ELF file ({0}): re-extract the vmlinux from the kernel package")]
    BadElf(String),
    /// The image lacks `.BTF`, so struct layouts cannot be known.
    #[error("vmlinux has no .BTF section: use a kernel built with CONFIG_DEBUG_INFO_BTF")]
    NoBtf,
    /// The image lacks `.rodata`, where kallsyms lives.
    #[error("vmlinux has no .rodata section: pass the kernel's vmlinux, not another ELF file")]
    NoRodata,
    /// The input is not an x86 bzImage.
    #[error("not an x86 bzImage (no boot-sector signature or 'HdrS' header): pass a vmlinuz/bzImage, or an ELF vmlinux directly to KernelImage")]
    NotBzImage,
    /// The boot protocol is too old to carry payload_offset/payload_length.
    #[error("bzImage boot protocol {major}.{minor:02} is older than 2.08 and has no payload fields: extract vmlinux with the kernel's scripts/extract-vmlinux")]
    OldBootProtocol {
        /// Boot protocol major version.
        major: u8,
        /// Boot protocol minor version.
        minor: u8,
    },
    /// The header points outside the file.
    #[error("bzImage payload (offset {offset:#x}, length {length:#x}) lies outside the {file_len:#x}-byte file: the file is truncated or corrupt, download it again")]
    PayloadOutOfBounds {
        /// Payload start in the file.
        offset: u64,
        /// Payload length from the header.
        length: u64,
        /// Length of the file we were given.
        file_len: u64,
    },
    /// The payload uses a compression we do not decode.
    #[error("bzImage payload is compressed with {0}, which vmwatch does not decode: extract vmlinux with the kernel's scripts/extract-vmlinux")]
    UnsupportedCompression(Compression),
    /// Decompression failed.
    #[error("cannot decompress the {format} bzImage payload: {message}: the file is corrupt, download it again")]
    Decompress {
        /// The payload's compression.
        format: Compression,
        /// What the decoder reported.
        message: String,
    },
    /// Decompression would exceed [`MAX_DECOMPRESSED_LEN`].
    #[error("decompressed bzImage payload exceeds {MAX_DECOMPRESSED_LEN} bytes: refusing it as corrupt or hostile")]
    DecompressedTooLarge,
    /// The payload decompressed but is not an ELF vmlinux.
    #[error("the decompressed bzImage payload is not an ELF vmlinux: this kernel's layout is not supported, extract it with scripts/extract-vmlinux")]
    PayloadNotElf,
}

/// Compression formats a bzImage payload may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (CONFIG_KERNEL_GZIP).
    Gzip,
    /// XZ with the x86 BCJ filter (CONFIG_KERNEL_XZ; Debian 6.1).
    Xz,
    /// Zstandard (CONFIG_KERNEL_ZSTD; Debian 6.12).
    Zstd,
    /// bzip2 (not decoded).
    Bzip2,
    /// Legacy LZMA (not decoded).
    Lzma,
    /// LZO (not decoded).
    Lzo,
    /// LZ4 (not decoded).
    Lz4,
    /// No recognised magic.
    Unknown,
}

impl Compression {
    /// Recognises a compressed stream by its magic bytes.
    pub fn detect(payload: &[u8]) -> Self {
        if payload.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if payload.starts_with(b"\xfd7zXZ\x00") {
            Self::Xz
        } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else if payload.starts_with(b"BZh") {
            Self::Bzip2
        } else if payload.starts_with(&[0x5d, 0x00, 0x00]) {
            Self::Lzma
        } else if payload.starts_with(&[0x89, b'L', b'Z', b'O']) {
            Self::Lzo
        } else if payload.starts_with(&[0x02, 0x21, 0x4c, 0x18]) {
            Self::Lz4
        } else {
            Self::Unknown
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Gzip => "gzip",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
            Self::Bzip2 => "bzip2",
            Self::Lzma => "lzma",
            Self::Lzo => "lzo",
            Self::Lz4 => "lz4",
            Self::Unknown => "an unknown format",
        };
        f.write_str(name)
    }
}

/// A section of the image: its link-time address and its bytes in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section<'a> {
    /// Link-time (unslid) kernel virtual address of the first byte.
    pub addr: u64,
    /// The section's contents as stored in the file.
    pub data: &'a [u8],
}

/// Where a section's bytes live, checked against the file at open time.
#[derive(Debug, Clone)]
struct SectionInfo {
    name: String,
    addr: u64,
    offset: usize,
    len: usize,
}

/// A file-backed range of virtual addresses (a PT_LOAD segment or a section).
#[derive(Debug, Clone, Copy)]
struct Mapping {
    vaddr: u64,
    offset: usize,
    len: usize,
}

/// The bytes of the image: mapped from a file, or owned.
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// An ELF `vmlinux`, parsed once; sections and segments are looked up by
/// name or link-time virtual address.
pub struct KernelImage {
    bytes: Bytes,
    sections: Vec<SectionInfo>,
    /// PT_LOAD segments first, then allocated sections, so addresses are
    /// resolved through the program headers when they exist.
    mappings: Vec<Mapping>,
}

impl fmt::Debug for KernelImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelImage")
            .field("len", &self.bytes.as_slice().len())
            .field("sections", &self.sections.len())
            .field("mappings", &self.mappings.len())
            .finish()
    }
}

impl KernelImage {
    /// Opens an ELF vmlinux by mapping the file read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let io_err = |source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        // SAFETY: the map is read-only and private to us. Another process
        // truncating or rewriting the file while it is mapped could change
        // the bytes under us (or fault on access); kernel images are
        // install-time artefacts that are replaced, not rewritten in place,
        // and every byte is parsed as untrusted anyway.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)?;
        Self::from_storage(Bytes::Mapped(map))
    }

    /// Parses an ELF vmlinux held in memory (e.g. from [`extract_vmlinux`]).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, ImageError> {
        Self::from_storage(Bytes::Owned(bytes))
    }

    /// Opens either an ELF vmlinux or a bzImage/vmlinuz, extracting the
    /// latter, so callers can point at whatever the kernel package ships.
    pub fn open_any(path: impl AsRef<Path>) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let io_err = |source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut magic = [0u8; 4];
        let mut file = File::open(path).map_err(io_err)?;
        let n = file.read(&mut magic).map_err(io_err)?;
        if n == 4 && &magic == ELF_MAGIC {
            return Self::open(path);
        }
        let data = std::fs::read(path).map_err(io_err)?;
        Self::from_bytes(extract_vmlinux(&data)?)
    }

    fn from_storage(bytes: Bytes) -> Result<Self, ImageError> {
        let data = bytes.as_slice();
        if !data.starts_with(ELF_MAGIC) {
            return Err(ImageError::NotElf);
        }
        let elf =
            ElfFile64::<Endianness>::parse(data).map_err(|e| ImageError::BadElf(e.to_string()))?;
        let file_len = data.len();
        let in_file = |offset: u64, len: u64| -> Option<(usize, usize)> {
            let offset = usize::try_from(offset).ok()?;
            let len = usize::try_from(len).ok()?;
            (offset.checked_add(len)? <= file_len).then_some((offset, len))
        };

        let mut mappings = Vec::new();
        let endian = elf.endian();
        for segment in elf.elf_program_headers() {
            if segment.p_type(endian) != object::elf::PT_LOAD {
                continue;
            }
            let (offset, filesz) = (segment.p_offset(endian), segment.p_filesz(endian));
            if let Some((offset, len)) = in_file(offset, filesz) {
                mappings.push(Mapping {
                    vaddr: segment.p_vaddr(endian),
                    offset,
                    len,
                });
            }
        }
        let mut sections = Vec::new();
        for section in elf.sections() {
            let Ok(name) = section.name() else { continue };
            let Some((offset, size)) = section.file_range() else {
                continue; // SHT_NOBITS (.bss) or no data
            };
            let Some((offset, len)) = in_file(offset, size) else {
                continue;
            };
            let addr = section.address();
            sections.push(SectionInfo {
                name: name.to_owned(),
                addr,
                offset,
                len,
            });
            if addr != 0 {
                mappings.push(Mapping {
                    vaddr: addr,
                    offset,
                    len,
                });
            }
        }
        Ok(Self {
            bytes,
            sections,
            mappings,
        })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// A section by name (e.g. `.BTF`, `.rodata`), if present and backed by
    /// file data.
    pub fn section(&self, name: &str) -> Option<Section<'_>> {
        let info = self.sections.iter().find(|s| s.name == name)?;
        let data = self
            .bytes
            .as_slice()
            .get(info.offset..info.offset.checked_add(info.len)?)?;
        Some(Section {
            addr: info.addr,
            data,
        })
    }

    /// Names of all file-backed sections, in file order.
    pub fn section_names(&self) -> impl Iterator<Item = &str> {
        self.sections.iter().map(|s| s.name.as_str())
    }

    /// Reads `len` bytes at a link-time kernel virtual address, if the whole
    /// range is backed by file data in one segment or section.
    ///
    /// Addresses in `.bss` or spanning two segments return `None`.
    pub fn read_vaddr(&self, va: u64, len: usize) -> Option<&[u8]> {
        let data = self.bytes.as_slice();
        self.mappings.iter().find_map(|m| {
            let rel = va.checked_sub(m.vaddr)?;
            let rel = usize::try_from(rel).ok()?;
            let end = rel.checked_add(len)?;
            if end > m.len {
                return None;
            }
            let start = m.offset.checked_add(rel)?;
            data.get(start..start.checked_add(len)?)
        })
    }

    /// The raw `.BTF` section, which describes every kernel struct.
    pub fn btf(&self) -> Option<&[u8]> {
        self.section(".BTF").map(|s| s.data)
    }

    /// Like [`Self::btf`], but with an error that tells the user what to do.
    pub fn require_btf(&self) -> Result<&[u8], ImageError> {
        self.btf().ok_or(ImageError::NoBtf)
    }

    /// `.rodata`, where the kallsyms tables live.
    pub fn rodata(&self) -> Result<Section<'_>, ImageError> {
        self.section(".rodata").ok_or(ImageError::NoRodata)
    }
}

/// Offsets in the x86 boot header (Documentation/arch/x86/boot.rst).
mod boot_header {
    /// Number of 512-byte setup sectors; 0 means 4.
    pub const SETUP_SECTS: usize = 0x1f1;
    /// 0xAA55 boot-sector signature.
    pub const BOOT_FLAG: usize = 0x1fe;
    /// "HdrS".
    pub const HEADER: usize = 0x202;
    /// Boot protocol version (u16, major << 8 | minor).
    pub const VERSION: usize = 0x206;
    /// Offset of the compressed payload from the protected-mode code start.
    pub const PAYLOAD_OFFSET: usize = 0x248;
    /// Length of the payload.
    pub const PAYLOAD_LENGTH: usize = 0x24c;
}

fn read_u8(data: &[u8], at: usize) -> Option<u8> {
    data.get(at).copied()
}

fn read_u16(data: &[u8], at: usize) -> Option<u16> {
    let b = data.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = data.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

/// Extracts the ELF vmlinux from an x86 bzImage (`vmlinuz`).
///
/// Reads the boot header to find the compressed payload, decodes it (XZ with
/// the x86 BCJ filter, ZSTD or gzip) and checks the result is an ELF file.
/// The output may carry trailing data (the relocation table the
/// decompressor appends); ELF parsing ignores it.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, ImageError> {
    use boot_header::*;
    let header_ok = read_u16(bzimage, BOOT_FLAG) == Some(0xaa55)
        && bzimage.get(HEADER..HEADER + 4) == Some(b"HdrS".as_slice());
    if !header_ok {
        return Err(ImageError::NotBzImage);
    }
    let version = read_u16(bzimage, VERSION).ok_or(ImageError::NotBzImage)?;
    if version < 0x0208 {
        return Err(ImageError::OldBootProtocol {
            major: (version >> 8) as u8,
            minor: (version & 0xff) as u8,
        });
    }
    let setup_sects = match read_u8(bzimage, SETUP_SECTS).ok_or(ImageError::NotBzImage)? {
        0 => 4,
        n => u64::from(n),
    };
    let payload_offset = read_u32(bzimage, PAYLOAD_OFFSET).ok_or(ImageError::NotBzImage)?;
    let payload_length = read_u32(bzimage, PAYLOAD_LENGTH).ok_or(ImageError::NotBzImage)?;
    let start = (setup_sects + 1) * 512 + u64::from(payload_offset);
    let end = start + u64::from(payload_length);
    let file_len = bzimage.len() as u64;
    let out_of_bounds = || ImageError::PayloadOutOfBounds {
        offset: start,
        length: u64::from(payload_length),
        file_len,
    };
    if end > file_len {
        return Err(out_of_bounds());
    }
    let payload = usize::try_from(start)
        .ok()
        .zip(usize::try_from(end).ok())
        .and_then(|(s, e)| bzimage.get(s..e))
        .ok_or_else(out_of_bounds)?;

    let out = decompress(payload)?;
    if !out.starts_with(ELF_MAGIC) {
        return Err(ImageError::PayloadNotElf);
    }
    Ok(out)
}

/// Decompresses one stream of a recognised format, capped at
/// [`MAX_DECOMPRESSED_LEN`]. Trailing bytes after the stream (the kernel
/// appends the uncompressed size) are ignored.
fn decompress(payload: &[u8]) -> Result<Vec<u8>, ImageError> {
    let format = Compression::detect(payload);
    let err = |e: std::io::Error| ImageError::Decompress {
        format,
        message: e.to_string(),
    };
    let mut out = Vec::new();
    let n = match format {
        Compression::Xz => liblzma::read::XzDecoder::new(payload)
            .take(MAX_DECOMPRESSED_LEN + 1)
            .read_to_end(&mut out)
            .map_err(err)?,
        Compression::Gzip => flate2::read::GzDecoder::new(payload)
            .take(MAX_DECOMPRESSED_LEN + 1)
            .read_to_end(&mut out)
            .map_err(err)?,
        Compression::Zstd => {
            let decoder = ruzstd::decoding::StreamingDecoder::new(payload).map_err(|e| {
                ImageError::Decompress {
                    format,
                    message: e.to_string(),
                }
            })?;
            decoder
                .take(MAX_DECOMPRESSED_LEN + 1)
                .read_to_end(&mut out)
                .map_err(err)?
        }
        other => return Err(ImageError::UnsupportedCompression(other)),
    };
    if n as u64 > MAX_DECOMPRESSED_LEN {
        return Err(ImageError::DecompressedTooLarge);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal bzImage-shaped buffer around `payload`.
    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 2u8;
        let mut img = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        img[boot_header::SETUP_SECTS] = setup_sects;
        img[boot_header::BOOT_FLAG..boot_header::BOOT_FLAG + 2]
            .copy_from_slice(&0xaa55u16.to_le_bytes());
        img[boot_header::HEADER..boot_header::HEADER + 4].copy_from_slice(b"HdrS");
        img[boot_header::VERSION..boot_header::VERSION + 2]
            .copy_from_slice(&0x020fu16.to_le_bytes());
        let payload_offset = 0x10u32;
        img[boot_header::PAYLOAD_OFFSET..boot_header::PAYLOAD_OFFSET + 4]
            .copy_from_slice(&payload_offset.to_le_bytes());
        img[boot_header::PAYLOAD_LENGTH..boot_header::PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(&[0u8; 0x10]);
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn extracts_gzip_payload() {
        use flate2::write::GzEncoder;
        use std::io::Write;
        let elf = b"\x7fELF rest of a pretend kernel".to_vec();
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&elf).unwrap();
        let mut payload = enc.finish().unwrap();
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes()); // size_append
        assert_eq!(extract_vmlinux(&fake_bzimage(&payload)).unwrap(), elf);
    }

    #[test]
    fn extracts_xz_payload() {
        use std::io::Write;
        let elf = b"\x7fELF an xz kernel".repeat(100);
        let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 1);
        enc.write_all(&elf).unwrap();
        let payload = enc.finish().unwrap();
        assert_eq!(extract_vmlinux(&fake_bzimage(&payload)).unwrap(), elf);
    }

    #[test]
    fn rejects_non_elf_payload_and_garbage() {
        use flate2::write::GzEncoder;
        use std::io::Write;
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(b"not an elf").unwrap();
        let payload = enc.finish().unwrap();
        assert!(matches!(
            extract_vmlinux(&fake_bzimage(&payload)),
            Err(ImageError::PayloadNotElf)
        ));
        assert!(matches!(
            extract_vmlinux(b"short"),
            Err(ImageError::NotBzImage)
        ));
        let mut img = fake_bzimage(b"BZh91AY");
        assert!(matches!(
            extract_vmlinux(&img),
            Err(ImageError::UnsupportedCompression(Compression::Bzip2))
        ));
        img.truncate(img.len() - 3);
        assert!(matches!(
            extract_vmlinux(&img),
            Err(ImageError::PayloadOutOfBounds { .. })
        ));
    }

    #[test]
    fn non_elf_is_rejected() {
        assert!(matches!(
            KernelImage::from_bytes(b"MZ not elf".to_vec()),
            Err(ImageError::NotElf)
        ));
        assert!(matches!(
            KernelImage::from_bytes(b"\x7fELF\x02".to_vec()),
            Err(ImageError::BadElf(_))
        ));
    }

    #[test]
    fn error_messages_are_one_line() {
        let e = ImageError::NoBtf.to_string();
        assert!(e.contains("CONFIG_DEBUG_INFO_BTF") && !e.contains('\n'));
    }
}
