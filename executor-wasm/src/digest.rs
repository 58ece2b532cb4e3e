//! Content addresses of modules: the wire's [`Digest`] (the sha256 of a module's bytes, the key
//! of the in-memory and on-disk module caches and the name a task uses to refer to a module that
//! was delivered earlier), plus the launch-side parser that also takes a `sha256:` prefix.

pub use agora_sdk::proto::Digest;

use crate::error::WasmError;

/// Parses 64 hex digits, optionally prefixed by `sha256:`.
pub(crate) fn parse(s: &str) -> Result<Digest, WasmError> {
    let hex_part = s.strip_prefix("sha256:").unwrap_or(s);
    Digest::parse(hex_part).map_err(|_| WasmError::BadDigest { value: s.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_round_trips_through_hex() {
        let d = Digest::of(b"hello");
        assert_eq!(d.to_string(), "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(parse(&d.to_string()).unwrap(), d);
        assert_eq!(parse(&format!("sha256:{d}")).unwrap(), d);
        assert_eq!(parse(&d.to_string().to_ascii_uppercase()).unwrap(), d);
        assert!(parse("xyz").is_err());
        assert!(parse("abcd").is_err());
    }
}
