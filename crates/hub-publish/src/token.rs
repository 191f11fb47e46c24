//! The Hugging Face token: where it comes from, and a type that never prints it.

use std::fmt;
use std::path::{Path, PathBuf};

/// An access token. `Debug` and `Display` show only where it came from and its last four
/// characters' absence: the value itself leaves this type only as an HTTP header.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    value: String,
    source: TokenSource,
}

/// Where a token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `--token` (or the library caller).
    Explicit,
    /// The `HF_TOKEN` environment variable.
    Environment,
    /// A token file (`$HF_TOKEN_PATH`, `$HF_HOME/token`, `~/.cache/huggingface/token`).
    File(PathBuf),
}

impl Token {
    /// A token given explicitly. Surrounding whitespace is dropped.
    pub fn new(value: impl Into<String>) -> Token {
        Token {
            value: value.into().trim().to_string(),
            source: TokenSource::Explicit,
        }
    }

    /// The secret, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.value
    }

    pub fn source(&self) -> &TokenSource {
        &self.source
    }

    /// `text` with every occurrence of the token replaced by `hf_***`.
    pub fn redact(&self, text: &str) -> String {
        if self.value.len() < 4 {
            // Too short to search for without mangling ordinary words; such a token is
            // rejected by the Hub anyway.
            return text.to_string();
        }
        text.replace(&self.value, "hf_***")
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(hf_***, from {})", self.source)
    }
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Explicit => f.write_str("--token"),
            TokenSource::Environment => f.write_str("HF_TOKEN"),
            TokenSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The token the way `huggingface_hub` finds it: the explicit one, else `HF_TOKEN`, else the
/// token file (`HF_TOKEN_PATH`, else `$HF_HOME/token`, else `~/.cache/huggingface/token`).
/// Empty values count as absent.
pub fn resolve_token(explicit: Option<&str>) -> Option<Token> {
    resolve_token_with(explicit, |k| std::env::var(k).ok())
}

/// [`resolve_token`] with the environment given as a function (for tests).
pub fn resolve_token_with(
    explicit: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Option<Token> {
    if let Some(t) = explicit.map(str::trim).filter(|t| !t.is_empty()) {
        return Some(Token::new(t));
    }
    if let Some(t) = env("HF_TOKEN").map(|t| t.trim().to_string()) {
        if !t.is_empty() {
            return Some(Token {
                value: t,
                source: TokenSource::Environment,
            });
        }
    }
    let file = token_file_with(&env)?;
    let text = std::fs::read_to_string(&file).ok()?;
    let value = text.trim().to_string();
    (!value.is_empty()).then_some(Token {
        value,
        source: TokenSource::File(file),
    })
}

fn token_file_with(env: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(p) = env("HF_TOKEN_PATH").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = env("HF_HOME").filter(|p| !p.is_empty()) {
        return Some(Path::new(&home).join("token"));
    }
    if let Some(cache) = env("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return Some(Path::new(&cache).join("huggingface").join("token"));
    }
    let home = env("HOME").filter(|p| !p.is_empty())?;
    Some(Path::new(&home).join(".cache/huggingface/token"))
}

/// The endpoint: the explicit one, else `HF_ENDPOINT`, else `https://huggingface.co`; without
/// a trailing slash.
pub fn resolve_endpoint(explicit: Option<&str>) -> String {
    explicit
        .map(str::to_string)
        .or_else(|| std::env::var("HF_ENDPOINT").ok())
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| "https://huggingface.co".to_string())
        .trim()
        .trim_end_matches('/')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn order_is_explicit_then_env_then_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hf_fromfile\n").unwrap();
        let home = dir.path().to_str().unwrap();
        let t = resolve_token_with(
            Some(" hf_explicit "),
            env_of(&[("HF_TOKEN", "hf_env"), ("HF_HOME", home)]),
        )
        .unwrap();
        assert_eq!(t.expose(), "hf_explicit");
        let t =
            resolve_token_with(None, env_of(&[("HF_TOKEN", "hf_env"), ("HF_HOME", home)])).unwrap();
        assert_eq!(t.expose(), "hf_env");
        assert_eq!(t.source(), &TokenSource::Environment);
        let t = resolve_token_with(None, env_of(&[("HF_TOKEN", ""), ("HF_HOME", home)])).unwrap();
        assert_eq!(t.expose(), "hf_fromfile");
        assert_eq!(t.source(), &TokenSource::File(dir.path().join("token")));
        assert!(resolve_token_with(None, env_of(&[("HOME", "/nonexistent")])).is_none());
    }

    #[test]
    fn the_default_token_file_is_under_the_home_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join(".cache/huggingface");
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(cache.join("token"), "hf_home").unwrap();
        let t =
            resolve_token_with(None, env_of(&[("HOME", dir.path().to_str().unwrap())])).unwrap();
        assert_eq!(t.expose(), "hf_home");
    }

    #[test]
    fn the_token_never_prints() {
        let t = Token::new("hf_supersecretvalue");
        assert!(!format!("{t:?}").contains("supersecret"));
        assert_eq!(
            t.redact("401 for Bearer hf_supersecretvalue at x"),
            "401 for Bearer hf_*** at x"
        );
    }
}
