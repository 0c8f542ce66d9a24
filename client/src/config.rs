//! Client configuration and the `concordctl.toml` file format.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::Error;

/// How to reach a cluster.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Node addresses (`host:port`); any one is enough to learn the rest.
    pub endpoints: Vec<String>,
    /// The cluster CA certificate to trust.
    pub ca: PathBuf,
    /// Deadline of one request attempt.
    pub request_timeout: Duration,
    /// Deadline of a QUIC handshake with one node.
    pub connect_timeout: Duration,
    /// Attempts per request (routing retries included).
    pub attempts_max: u32,
    /// How long a request waits for a range frozen by a merge ([`ApiError::Merging`]) to be
    /// taken in by its neighbour; answers `Merging` within this time use up no attempts.
    ///
    /// [`ApiError::Merging`]: concord_transport::api::ApiError::Merging
    pub merge_wait: Duration,
}

#[derive(Deserialize)]
struct File {
    endpoints: Vec<String>,
    ca: PathBuf,
    request_timeout_ms: Option<u64>,
    attempts_max: Option<u32>,
    merge_wait_ms: Option<u64>,
}

impl ClientConfig {
    /// A configuration for `endpoints` trusting `ca`, with default timeouts.
    pub fn new(endpoints: Vec<String>, ca: PathBuf) -> Self {
        Self {
            endpoints,
            ca,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            attempts_max: 12,
            merge_wait: Duration::from_secs(30),
        }
    }

    /// Reads a `concordctl.toml` (`endpoints = [...]`, `ca = "..."`, optional
    /// `request_timeout_ms`, `attempts_max`, `merge_wait_ms`); a relative `ca` is relative to
    /// the file.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let file: File =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let ca = if file.ca.is_relative() {
            path.parent().unwrap_or(Path::new(".")).join(file.ca)
        } else {
            file.ca
        };
        let mut config = Self::new(file.endpoints, ca);
        if let Some(ms) = file.request_timeout_ms {
            config.request_timeout = Duration::from_millis(ms);
        }
        if let Some(n) = file.attempts_max {
            config.attempts_max = n.max(1);
        }
        if let Some(ms) = file.merge_wait_ms {
            config.merge_wait = Duration::from_millis(ms);
        }
        Ok(config)
    }
}

/// Parses a duration as the command lines take it: a whole number and a unit, `ms`, `s`
/// (the default) or `m` (`500ms`, `90s`, `30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?} (ms, s, m)")),
    }
}
