//! The API token: 32 random bytes, hex, in `<state dir>/token` (0600), made
//! on first start and kept across restarts. Every request must carry
//! `Authorization: Bearer <token>`, also on the unix socket (its 0600 mode
//! is the first fence, the token the second, and the only one on TCP).

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, DaemonError};

/// The secret every request must present.
#[derive(Clone)]
pub struct Token {
    hex: Arc<str>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "Token({})", self.path.display())
    }
}

impl Token {
    /// Reads the token at `path`, or makes one if there is none.
    pub fn load_or_create(path: &Path) -> Result<Token, DaemonError> {
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut f) => {
                let hex = random_hex()?;
                f.write_all(hex.as_bytes())
                    .and_then(|_| f.write_all(b"\n"))
                    .map_err(DaemonError::io(path))?;
                return Ok(Token::new(hex, path));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(DaemonError::Io {
                    path: path.to_path_buf(),
                    source: e,
                })
            }
        }
        // Someone may have loosened the mode: the token is only as secret as its file.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(DaemonError::io(path))?;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(256).read_to_string(&mut text))
            .map_err(DaemonError::io(path))?;
        let hex = text.trim();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DaemonError::BadToken(path.to_path_buf()));
        }
        Ok(Token::new(hex.to_string(), path))
    }

    fn new(hex: String, path: &Path) -> Token {
        Token {
            hex: hex.into(),
            path: Arc::new(path.to_path_buf()),
        }
    }

    /// Whether an `Authorization` header value carries this token; compares
    /// in time independent of where the first difference is.
    pub fn accepts(&self, authorization: &[u8]) -> bool {
        let Some(given) = authorization.strip_prefix(b"Bearer ") else {
            return false;
        };
        let want = self.hex.as_bytes();
        if given.len() != want.len() {
            return false;
        }
        given
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn random_hex() -> Result<String, DaemonError> {
    let mut bytes = [0u8; 32];
    let urandom = Path::new("/dev/urandom");
    std::fs::File::open(urandom)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(DaemonError::io(urandom))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Middleware: 401 with a one-line JSON error unless the request has the token.
pub async fn require_token(State(token): State<Token>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| token.accepts(v.as_bytes()));
    if ok {
        return next.run(req).await;
    }
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        format!(
            "missing or wrong token: send `Authorization: Bearer <token>` with the token in {}",
            token.path().display()
        ),
    )
    .into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_made_once_and_checked() {
        let dir = std::env::temp_dir().join(format!("vmwatchd-auth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        let t = Token::load_or_create(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = Token::load_or_create(&path).unwrap();
        assert_eq!(t.hex, again.hex);
        assert!(t.accepts(format!("Bearer {}", t.hex).as_bytes()));
        assert!(!t.accepts(format!("Bearer {}0", t.hex).as_bytes()));
        assert!(!t.accepts(format!("bearer {}", t.hex).as_bytes()));
        assert!(!t.accepts(b"Bearer "));
        assert!(!format!("{t:?}").contains(&*t.hex));
        std::fs::write(&path, "short\n").unwrap();
        let e = Token::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("delete it and restart vmwatchd"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
