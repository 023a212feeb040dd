//! Small JSON and key files under the state dir, written atomically (temp file, fsync, rename)
//! so that a crash never leaves a half-written file behind.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};

/// Writes `bytes` to `path` atomically. On Unix the file gets `mode` before any byte is written.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    // The rename itself is durable only once the directory is.
    #[cfg(unix)]
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Serialises `value` as pretty JSON and writes it atomically with mode 0600.
pub fn save_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes, 0o600)
}

/// [`save_json`] on the blocking thread pool, so an fsync never stalls the async worker threads.
pub async fn save_json_off_thread<T: Serialize + Send + 'static>(
    path: PathBuf,
    value: T,
) -> io::Result<()> {
    tokio::task::spawn_blocking(move || save_json(&path, &value)).await.map_err(io::Error::other)?
}

/// Reads JSON from `path`; `Ok(None)` when the file does not exist.
///
/// A file that exists but does not parse is an error naming the file: state is never silently
/// replaced by defaults.
pub fn load_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/state.json");
        assert_eq!(load_json::<Vec<u32>>(&path).expect("missing is fine"), None);
        save_json(&path, &vec![1u32, 2]).expect("save");
        assert_eq!(load_json::<Vec<u32>>(&path).expect("load"), Some(vec![1, 2]));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        fs::write(&path, b"{not json").expect("write");
        let err = load_json::<Vec<u32>>(&path).expect_err("corrupt");
        assert!(err.to_string().contains("state.json"), "{err}");
    }
}
