//! A Hub-compatible HTTP server on 127.0.0.1 for the publish tests: the endpoints that
//! `hf-hub`, `weightsmith publish` and the Python `huggingface_hub` client call (repo create,
//! model info, branch, paths-info, tree, preupload, the LFS batch API with the `basic` and
//! `multipart` transfers, verify, commit, resolve with ranges and, on demand, a 302 to a CDN
//! route, as the Hub sends LFS files), kept in memory, with every request
//! recorded and failures injectable.
//!
//! It follows the Hub's answers as `huggingface_hub` reads them (field names, headers such as
//! `X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size`), and checks what it receives: an LFS
//! object whose bytes do not hash to its oid, a commit that names an LFS object never
//! uploaded, or a multipart completion with wrong ETags are refused as the Hub refuses them.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// How the server answers the LFS batch call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    Basic,
    /// Parts of this many bytes.
    Multipart(u64),
}

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub body_len: usize,
    pub authorization: Option<String>,
    pub status: u16,
}

#[derive(Debug, Clone)]
struct Fault {
    method: String,
    path_contains: String,
    status: u16,
    remaining: u32,
}

#[derive(Debug, Clone, Default)]
pub struct StoredFile {
    pub content: Vec<u8>,
    pub lfs: bool,
    /// A sparse file: `content` then zeros up to this length, never held in memory (a
    /// 70B-shaped repository whose headers are real). Its oid is the SHA-256 of `content`.
    pub sparse_len: Option<u64>,
    /// The SHA-256 of `content`, computed once (a GB shard is hashed once, not per request).
    pub sha256_once: std::sync::OnceLock<String>,
}

impl StoredFile {
    pub fn new(content: Vec<u8>, lfs: bool) -> StoredFile {
        StoredFile {
            content,
            lfs,
            ..StoredFile::default()
        }
    }

    pub fn len(&self) -> u64 {
        self.sparse_len.unwrap_or(self.content.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes `from..to` (end exclusive, clamped).
    fn bytes(&self, from: u64, to: u64) -> Vec<u8> {
        let to = to.min(self.len()) as usize;
        let from = (from as usize).min(to);
        let held = to.min(self.content.len());
        let mut out = Vec::with_capacity(to - from);
        if from < held {
            out.extend_from_slice(&self.content[from..held]);
        }
        out.resize(to - from, 0);
        out
    }

    fn sha256(&self) -> String {
        self.sha256_once
            .get_or_init(|| sha256_hex(&self.content))
            .clone()
    }
}

/// A fault in a file's body: the connection dropped after `after` bytes, or one byte flipped.
#[derive(Debug, Clone)]
pub enum BodyFault {
    DropAfter(usize),
    Corrupt,
}

#[derive(Debug, Clone, Default)]
pub struct Branch {
    pub commit: String,
    pub files: BTreeMap<String, StoredFile>,
}

#[derive(Debug, Clone, Default)]
pub struct Repo {
    pub private: bool,
    /// Gated: files need a valid token (401 with X-Error-Code GatedRepo otherwise).
    pub gated: bool,
    pub branches: BTreeMap<String, Branch>,
    pub prs: u32,
    pub commit_messages: Vec<String>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    lfs: HashMap<String, Vec<u8>>,
    parts: HashMap<(String, u64), Vec<u8>>,
    log: Vec<Logged>,
    faults: Vec<Fault>,
    commits: u64,
    token: String,
    /// Tokens that authenticate but may not write.
    read_only_tokens: Vec<String>,
    transfer: Option<Transfer>,
    /// Bytes of response bodies sent (HEAD answers send none).
    bytes_sent: u64,
    /// LFS files are answered with a 302 to `/_cdn/…` (as the Hub sends them to its CDN),
    /// the 302 carrying X-Repo-Commit, X-Linked-Etag and X-Linked-Size.
    redirect_lfs: bool,
    body_faults: Vec<(String, BodyFault, u32)>,
    /// Bodies carried at most this fast, both ways (a slow link, so that a test can stop a
    /// client in the middle of a transfer).
    throttle: Option<u64>,
}

/// The running server; stopped when dropped.
pub struct HubServer {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HubServer {
    /// Starts a server that accepts `token` (as `Authorization: Bearer <token>`). Plain
    /// HTTP/1.1 with keep-alive, a thread per connection, bodies by Content-Length or chunked.
    pub fn start(token: &str, transfer: Transfer) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().expect("addr").port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let state = Arc::new(Mutex::new(State {
            token: token.to_string(),
            transfer: Some(transfer),
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let state = state.clone();
            let stop = stop.clone();
            let endpoint = endpoint.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let state = state.clone();
                            let stop = stop.clone();
                            let endpoint = endpoint.clone();
                            std::thread::spawn(move || {
                                serve_connection(conn, &state, &endpoint, &stop)
                            });
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                        Err(_) => break,
                    }
                }
            })
        };
        HubServer {
            endpoint,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// Adds a token that authenticates but may not write (403 on writes).
    pub fn add_read_only_token(&self, token: &str) {
        self.state
            .lock()
            .unwrap()
            .read_only_tokens
            .push(token.to_string());
    }

    /// The next `times` requests with this method whose path contains `path_contains` get
    /// `status` (with a JSON error body) instead of an answer.
    pub fn fail(&self, method: &str, path_contains: &str, status: u16, times: u32) {
        self.state.lock().unwrap().faults.push(Fault {
            method: method.to_string(),
            path_contains: path_contains.to_string(),
            status,
            remaining: times,
        });
    }

    /// Creates (or replaces) `repo_id` with one commit on main holding `files`.
    pub fn put_repo(&self, repo_id: &str, files: Vec<(String, StoredFile)>, gated: bool) {
        let mut st = self.state.lock().unwrap();
        st.commits += 1;
        let main = Branch {
            commit: commit_id(st.commits),
            files: files.into_iter().collect(),
        };
        let mut repo = Repo {
            gated,
            ..Repo::default()
        };
        repo.branches.insert("main".into(), main);
        st.repos.insert(repo_id.to_string(), repo);
    }

    /// The next `times` GETs of a file whose path contains `path_contains` get `fault`.
    pub fn body_fault(&self, path_contains: &str, fault: BodyFault, times: u32) {
        self.state
            .lock()
            .unwrap()
            .body_faults
            .push((path_contains.to_string(), fault, times));
    }

    /// Answer LFS files with a redirect to `/_cdn/…`, as the Hub does.
    /// Carries request and response bodies at most `bytes_per_second` fast (None: as fast as
    /// it can).
    pub fn throttle(&self, bytes_per_second: Option<u64>) {
        self.state.lock().unwrap().throttle = bytes_per_second;
    }

    pub fn redirect_lfs(&self, on: bool) {
        self.state.lock().unwrap().redirect_lfs = on;
    }

    /// Bytes of response bodies sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.state.lock().unwrap().bytes_sent
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }

    /// A repository's state, if it exists.
    pub fn repo(&self, repo_id: &str) -> Option<Repo> {
        self.state.lock().unwrap().repos.get(repo_id).cloned()
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One parsed request.
struct Request {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_request(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(url)) = (parts.next(), parts.next()) else {
        return Err(std::io::Error::other("bad request line"));
    };
    let (method, url) = (method.to_string(), url.to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(std::io::Error::other("eof in headers"));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut req = Request {
        method,
        url,
        headers,
        body: Vec::new(),
    };
    if req
        .header("Transfer-Encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if n == 0 {
                let mut end = String::new();
                while r.read_line(&mut end)? > 2 {
                    end.clear();
                }
                break;
            }
            let start = req.body.len();
            req.body.resize(start + n, 0);
            r.read_exact(&mut req.body[start..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(n) = req
        .header("Content-Length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        req.body.resize(n, 0);
        r.read_exact(&mut req.body)?;
    }
    Ok(Some(req))
}

fn serve_connection(conn: TcpStream, state: &Arc<Mutex<State>>, endpoint: &str, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_millis(200)));
    let _ = conn.set_nodelay(true);
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    loop {
        // Wait for the next request line without holding up shutdown.
        match reader.fill_buf() {
            Ok([]) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                continue;
            }
            Err(_) => return,
        }
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(std::time::Duration::from_secs(30)));
        let req = match read_request(&mut reader) {
            Ok(Some(r)) => r,
            _ => return,
        };
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(std::time::Duration::from_millis(200)));
        // A slow link takes as long to carry a request's body as a response's.
        let throttle = state.lock().unwrap().throttle;
        if let Some(rate) = throttle.filter(|_| !req.body.is_empty()) {
            std::thread::sleep(std::time::Duration::from_secs_f64(
                req.body.len() as f64 / rate as f64,
            ));
        }
        let head = req.method == "HEAD";
        let close = req
            .header("Connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let answer = handle(&req, state, endpoint);
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            answer.status,
            reason(answer.status),
            answer.content_type,
            answer.head_length.unwrap_or(answer.body.len() as u64)
        );
        for (k, v) in &answer.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        let mut body: &[u8] = &[];
        if !head {
            body = match answer.truncate {
                Some(n) => &answer.body[..n.min(answer.body.len())],
                None => &answer.body[..],
            };
            state.lock().unwrap().bytes_sent += body.len() as u64;
        }
        let throttle = state.lock().unwrap().throttle;
        let sent = match throttle {
            None => {
                bytes.extend_from_slice(body);
                writer.write_all(&bytes)
            }
            Some(rate) => writer.write_all(&bytes).and_then(|_| {
                // 64 KiB at a time, each after the time the rate gives it.
                let started = std::time::Instant::now();
                let mut done = 0u64;
                for chunk in body.chunks(64 << 10) {
                    writer.write_all(chunk)?;
                    done += chunk.len() as u64;
                    let due = std::time::Duration::from_secs_f64(done as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                Ok(())
            }),
        };
        if sent.and_then(|_| writer.flush()).is_err() || close || answer.truncate.is_some() {
            return;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        422 => "Unprocessable Entity",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

struct Answer {
    /// Send only this many body bytes, then close (an injected dropped connection).
    truncate: Option<usize>,
    /// The Content-Length of a HEAD answer, whose body is not sent (nor made).
    head_length: Option<u64>,
    status: u16,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
    content_type: &'static str,
}

fn json_answer(status: u16, v: Value) -> Answer {
    Answer {
        truncate: None,
        head_length: None,
        status,
        body: serde_json::to_vec(&v).unwrap(),
        headers: Vec::new(),
        content_type: "application/json",
    }
}

fn error(status: u16, message: &str) -> Answer {
    let mut a = json_answer(status, json!({ "error": message }));
    a.headers
        .push(("X-Error-Message".into(), message.replace(['\r', '\n'], " ")));
    a
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn git_oid(b: &[u8]) -> String {
    use sha1::Digest as _;
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    h.finalize().iter().map(|x| format!("{x:02x}")).collect()
}

fn handle(req: &Request, state: &Arc<Mutex<State>>, endpoint: &str) -> Answer {
    let method = req.method.to_uppercase();
    let url = req.url.clone();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let auth = req.header("Authorization").map(str::to_string);
    let body = &req.body;
    let answer = {
        let mut st = state.lock().unwrap();
        let fault = st
            .faults
            .iter_mut()
            .find(|f| f.remaining > 0 && f.method == method && path.contains(&f.path_contains));
        match fault {
            Some(f) => {
                f.remaining -= 1;
                let status = f.status;
                error(status, &format!("injected failure {status}"))
            }
            None => route(&mut st, req, &method, path, query, endpoint),
        }
    };
    state.lock().unwrap().log.push(Logged {
        method,
        path: url.clone(),
        body_len: body.len(),
        authorization: auth,
        status: answer.status,
    });
    answer
}

enum Auth {
    Ok,
    ReadOnly,
}

fn check_auth(st: &State, auth: Option<&str>) -> Result<Auth, Answer> {
    let Some(t) = auth.and_then(|a| a.strip_prefix("Bearer ")) else {
        return Err(error(401, "Invalid username or password."));
    };
    if t == st.token {
        Ok(Auth::Ok)
    } else if st.read_only_tokens.iter().any(|r| r == t) {
        Ok(Auth::ReadOnly)
    } else {
        Err(error(401, "Invalid credentials in Authorization header"))
    }
}

fn check_write(st: &State, auth: Option<&str>, repo: &str) -> Result<(), Answer> {
    match check_auth(st, auth)? {
        Auth::Ok => Ok(()),
        Auth::ReadOnly => Err(error(
            403,
            &format!("You don't have the rights to create a commit in {repo}"),
        )),
    }
}

fn route(
    st: &mut State,
    req: &Request,
    method: &str,
    path: &str,
    query: &str,
    endpoint: &str,
) -> Answer {
    let auth = req.header("Authorization");
    let range = req.header("Range");
    let body = &req.body[..];
    let segs: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    match (method, s.as_slice()) {
        ("POST", ["api", "repos", "create"]) => {
            if let Err(a) = check_write(st, auth, "this namespace") {
                return a;
            }
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                return error(400, "body is not JSON");
            };
            let (Some(name), Some(org)) = (
                v.get("name").and_then(Value::as_str),
                v.get("organization").and_then(Value::as_str),
            ) else {
                return error(400, "name and organization are required");
            };
            let id = format!("{org}/{name}");
            if st.repos.contains_key(&id) {
                return json_answer(
                    409,
                    json!({"error": "You already created this model repo", "url": format!("{endpoint}/{id}")}),
                );
            }
            st.commits += 1;
            let mut main = Branch {
                commit: commit_id(st.commits),
                files: BTreeMap::new(),
            };
            main.files.insert(
                ".gitattributes".into(),
                StoredFile::new(
                    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n".to_vec(),
                    false,
                ),
            );
            let mut repo = Repo {
                private: v.get("private").and_then(Value::as_bool).unwrap_or(false),
                ..Repo::default()
            };
            repo.branches.insert("main".into(), main);
            repo.commit_messages.push("initial commit".into());
            st.repos.insert(id.clone(), repo);
            json_answer(200, json!({"url": format!("{endpoint}/{id}"), "name": id}))
        }
        ("GET", ["api", "models", o, n]) => model_info(st, &format!("{o}/{n}"), "main"),
        ("GET", ["api", "models", o, n, "revision", rev]) => {
            model_info(st, &format!("{o}/{n}"), rev)
        }
        ("GET", ["api", "models", o, n, "tree", rev, ..]) => {
            let id = format!("{o}/{n}");
            match branch(st, &id, rev) {
                Ok(b) => json_answer(
                    200,
                    Value::Array(b.files.iter().map(|(p, f)| entry_json(p, f)).collect()),
                ),
                Err(a) => a,
            }
        }
        ("POST", ["api", "models", o, n, "branch", b]) => {
            let id = format!("{o}/{n}");
            if let Err(a) = check_write(st, auth, &id) {
                return a;
            }
            let Some(repo) = st.repos.get_mut(&id) else {
                return error(404, "Repository not found");
            };
            if repo.branches.contains_key(*b) {
                return error(409, "Reference already exists");
            }
            let main = repo.branches["main"].clone();
            repo.branches.insert(b.to_string(), main);
            json_answer(200, json!({}))
        }
        ("POST", ["api", "models", o, n, "paths-info", rev]) => {
            let id = format!("{o}/{n}");
            if let Err(a) = check_auth(st, auth) {
                return a;
            }
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                return error(400, "body is not JSON");
            };
            let b = match branch(st, &id, rev) {
                Ok(b) => b,
                Err(a) => return a,
            };
            let paths: Vec<&str> = v
                .get("paths")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            json_answer(
                200,
                Value::Array(
                    paths
                        .iter()
                        .filter_map(|p| b.files.get(*p).map(|f| entry_json(p, f)))
                        .collect(),
                ),
            )
        }
        ("POST", ["api", "models", o, n, "preupload", rev]) => {
            let id = format!("{o}/{n}");
            if let Err(a) = check_write(st, auth, &id) {
                return a;
            }
            if let Err(a) = branch(st, &id, rev) {
                return a;
            }
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                return error(400, "body is not JSON");
            };
            let files = v
                .get("files")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let b64 = base64::engine::general_purpose::STANDARD;
            let out: Vec<Value> = files
                .iter()
                .map(|f| {
                    let path = f.get("path").and_then(Value::as_str).unwrap_or_default();
                    let size = f.get("size").and_then(Value::as_u64).unwrap_or(0);
                    let sample = f
                        .get("sample")
                        .and_then(Value::as_str)
                        .and_then(|s| b64.decode(s).ok())
                        .unwrap_or_default();
                    let lfs = path.ends_with(".safetensors")
                        || path.ends_with(".bin")
                        || size > 10 * 1024 * 1024
                        || sample.contains(&0);
                    json!({"path": path, "uploadMode": if lfs {"lfs"} else {"regular"}, "shouldIgnore": false, "oid": null})
                })
                .collect();
            json_answer(200, json!({ "files": out }))
        }
        ("POST", [o, n, "info", "lfs", "objects", "batch"]) if n.ends_with(".git") => {
            let id = format!("{o}/{}", n.trim_end_matches(".git"));
            if let Err(a) = check_write(st, auth, &id) {
                return a;
            }
            if !st.repos.contains_key(&id) {
                return error(404, "Repository not found");
            }
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                return error(400, "body is not JSON");
            };
            let offered: Vec<&str> = v
                .get("transfers")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_else(|| vec!["basic"]);
            let transfer = match st.transfer {
                Some(Transfer::Multipart(c)) if offered.contains(&"multipart") => Some(c),
                _ => None,
            };
            let objects = v
                .get("objects")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let out: Vec<Value> = objects
                .iter()
                .map(|o| {
                    let oid = o.get("oid").and_then(Value::as_str).unwrap_or_default();
                    let size = o.get("size").and_then(Value::as_u64).unwrap_or(0);
                    if st.lfs.get(oid).is_some_and(|b| b.len() as u64 == size) {
                        return json!({"oid": oid, "size": size, "authenticated": true});
                    }
                    let verify = json!({"href": format!("{endpoint}/_lfs_verify"), "header": {}});
                    match transfer {
                        Some(chunk) => {
                            let mut header = serde_json::Map::new();
                            header.insert("chunk_size".into(), json!(chunk.to_string()));
                            for i in 1..=size.div_ceil(chunk) {
                                header.insert(
                                    format!("{i:05}"),
                                    json!(format!("{endpoint}/_lfs_part/{oid}/{i}")),
                                );
                            }
                            json!({"oid": oid, "size": size, "authenticated": true, "actions": {
                                "upload": {"href": format!("{endpoint}/_lfs_complete/{oid}"), "header": header},
                                "verify": verify,
                            }})
                        }
                        None => json!({"oid": oid, "size": size, "authenticated": true, "actions": {
                            "upload": {"href": format!("{endpoint}/_lfs/{oid}"), "header": {}},
                            "verify": verify,
                        }}),
                    }
                })
                .collect();
            let mut a = json_answer(
                200,
                json!({"transfer": if transfer.is_some() {"multipart"} else {"basic"}, "objects": out}),
            );
            a.content_type = "application/vnd.git-lfs+json";
            a
        }
        ("PUT", ["_lfs", oid]) => {
            if sha256_hex(body) != *oid {
                return error(400, "content does not hash to the oid");
            }
            st.lfs.insert(oid.to_string(), body.to_vec());
            json_answer(200, json!({}))
        }
        ("PUT", ["_lfs_part", oid, n]) => {
            let Ok(n) = n.parse::<u64>() else {
                return error(400, "bad part number");
            };
            let etag = format!("\"{}\"", &sha256_hex(body)[..32]);
            st.parts.insert((oid.to_string(), n), body.to_vec());
            let mut a = json_answer(200, json!({}));
            a.headers.push(("ETag".into(), etag));
            a
        }
        ("POST", ["_lfs_complete", oid]) => {
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                return error(400, "body is not JSON");
            };
            let parts = v
                .get("parts")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let mut content = Vec::new();
            for (i, p) in parts.iter().enumerate() {
                let n = p.get("partNumber").and_then(Value::as_u64).unwrap_or(0);
                let etag = p.get("etag").and_then(Value::as_str).unwrap_or_default();
                if n != i as u64 + 1 {
                    return error(400, "parts out of order");
                }
                let Some(data) = st.parts.get(&(oid.to_string(), n)) else {
                    return error(400, &format!("part {n} was not uploaded"));
                };
                if etag != format!("\"{}\"", &sha256_hex(data)[..32]) {
                    return error(400, &format!("ETag of part {n} does not match"));
                }
                content.extend_from_slice(data);
            }
            if sha256_hex(&content) != *oid {
                return error(400, "assembled content does not hash to the oid");
            }
            st.parts.retain(|(o, _), _| o != oid);
            st.lfs.insert(oid.to_string(), content);
            json_answer(200, json!({}))
        }
        ("POST", ["_lfs_verify"]) => {
            if let Err(a) = check_auth(st, auth) {
                return a;
            }
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let oid = v.get("oid").and_then(Value::as_str).unwrap_or_default();
            let size = v.get("size").and_then(Value::as_u64).unwrap_or(u64::MAX);
            match st.lfs.get(oid) {
                Some(b) if b.len() as u64 == size => json_answer(200, json!({})),
                _ => error(404, "object not found or size differs"),
            }
        }
        ("POST", ["api", "models", o, n, "commit", rev]) => {
            let id = format!("{o}/{n}");
            if let Err(a) = check_write(st, auth, &id) {
                return a;
            }
            commit(st, &id, rev, query.contains("create_pr=1"), body, endpoint)
        }
        ("GET" | "HEAD", ["_cdn", o, n, rev, rest @ ..] | [o, n, "resolve", rev, rest @ ..]) => {
            let via_cdn = s[0] == "_cdn";
            let id = format!("{o}/{n}");
            resolve(st, method, &id, rev, rest, range, auth, endpoint, via_cdn)
        }
        _ => error(404, &format!("no route for {method} {path}")),
    }
}

/// A file of a repository at a revision, whole or a range; with `redirect_lfs`, an LFS file
/// is first a 302 to the CDN route, which serves it.
#[allow(clippy::too_many_arguments)]
fn resolve(
    st: &mut State,
    method: &str,
    id: &str,
    rev: &str,
    rest: &[&str],
    range: Option<&str>,
    auth: Option<&str>,
    endpoint: &str,
    via_cdn: bool,
) -> Answer {
    {
        {
            let id = id.to_string();
            let file_path = rest.join("/");
            if st.repos.get(&id).is_some_and(|r| r.gated) && check_auth(st, auth).is_err() {
                let mut a = error(401, &format!("Access to model {id} is restricted. You must have access to it and be authenticated to access it. Please log in."));
                a.headers.push(("X-Error-Code".into(), "GatedRepo".into()));
                return a;
            }
            let b = match branch(st, &id, rev) {
                Ok(b) => b,
                Err(a) => return a,
            };
            let Some(f) = b.files.get(&file_path) else {
                let mut a = error(404, "Entry not found");
                a.headers
                    .push(("X-Error-Code".into(), "EntryNotFound".into()));
                return a;
            };
            let commit = b.commit.clone();
            let total = f.len();
            if st.redirect_lfs && f.lfs && !via_cdn {
                let sha = f.sha256();
                let file_path = rest.join("/");
                return Answer {
                    truncate: None,
                    head_length: None,
                    status: 302,
                    body: Vec::new(),
                    headers: vec![
                        (
                            "Location".into(),
                            format!("{endpoint}/_cdn/{id}/{commit}/{file_path}"),
                        ),
                        ("X-Repo-Commit".into(), commit),
                        ("ETag".into(), format!("\"{sha}\"")),
                        ("X-Linked-Etag".into(), format!("\"{sha}\"")),
                        ("X-Linked-Size".into(), total.to_string()),
                    ],
                    content_type: "text/plain",
                };
            }
            // Range: bytes=a-b or bytes=a- (one range, as the Hub's CDN serves them).
            let range = range.and_then(|r| {
                let spec = r.strip_prefix("bytes=")?;
                let (a, b) = spec.split_once('-')?;
                let a: u64 = a.parse().ok()?;
                let b: u64 = if b.is_empty() {
                    total.saturating_sub(1)
                } else {
                    b.parse().ok()?
                };
                (a < total).then_some((a, b.min(total.saturating_sub(1))))
            });
            let (status, body, head_length) = match range {
                Some((a, b)) if method == "GET" => (206, f.bytes(a, b + 1), None),
                Some((a, b)) => (206, Vec::new(), Some(b + 1 - a)),
                None if method == "GET" => (200, f.bytes(0, total), None),
                None => (200, Vec::new(), Some(total)),
            };
            let mut a = Answer {
                truncate: None,
                head_length,
                status,
                body,
                headers: vec![
                    ("X-Repo-Commit".into(), commit),
                    ("Accept-Ranges".into(), "bytes".into()),
                ],
                content_type: "application/octet-stream",
            };
            if let Some((from, to)) = range {
                a.headers
                    .push(("Content-Range".into(), format!("bytes {from}-{to}/{total}")));
            }
            if f.lfs {
                let sha = f.sha256();
                a.headers.push(("ETag".into(), format!("\"{sha}\"")));
                a.headers
                    .push(("X-Linked-Etag".into(), format!("\"{sha}\"")));
                a.headers.push(("X-Linked-Size".into(), total.to_string()));
            } else {
                a.headers
                    .push(("ETag".into(), format!("\"{}\"", git_oid(&f.content))));
            }
            if method == "GET" {
                if let Some(k) = st
                    .body_faults
                    .iter()
                    .position(|(p, _, n)| *n > 0 && file_path.contains(p.as_str()))
                {
                    st.body_faults[k].2 -= 1;
                    match st.body_faults[k].1.clone() {
                        BodyFault::DropAfter(n) => a.truncate = Some(n),
                        BodyFault::Corrupt => {
                            if let Some(x) = a.body.last_mut() {
                                *x ^= 0xff;
                            }
                        }
                    }
                }
            }
            a
        }
    }
}

fn commit_id(n: u64) -> String {
    format!("{:040x}", 0x5eed_0000u64 + n)
}

fn entry_json(path: &str, f: &StoredFile) -> Value {
    if f.lfs {
        json!({"type": "file", "path": path, "size": f.len(),
               "oid": git_oid(format!("version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {}\n", f.sha256(), f.len()).as_bytes()),
               "lfs": {"oid": f.sha256(), "size": f.len(), "pointerSize": 134}})
    } else {
        json!({"type": "file", "path": path, "size": f.content.len(), "oid": git_oid(&f.content)})
    }
}

fn branch<'a>(st: &'a State, id: &str, rev: &str) -> Result<&'a Branch, Answer> {
    let Some(repo) = st.repos.get(id) else {
        let mut a = error(404, "Repository not found");
        a.headers
            .push(("X-Error-Code".into(), "RepoNotFound".into()));
        return Err(a);
    };
    // A branch name, or a commit id that a branch points at.
    repo.branches
        .get(rev)
        .or_else(|| repo.branches.values().find(|b| b.commit == rev))
        .ok_or_else(|| {
            let mut a = error(404, &format!("Invalid rev id: {rev}"));
            a.headers
                .push(("X-Error-Code".into(), "RevisionNotFound".into()));
            a
        })
}

fn model_info(st: &State, id: &str, rev: &str) -> Answer {
    match branch(st, id, rev) {
        Ok(b) => json_answer(
            200,
            json!({
                "id": id, "modelId": id, "sha": b.commit,
                "private": st.repos[id].private,
                "siblings": b.files.keys().map(|p| json!({"rfilename": p})).collect::<Vec<_>>(),
            }),
        ),
        Err(a) => a,
    }
}

fn commit(
    st: &mut State,
    id: &str,
    rev: &str,
    create_pr: bool,
    body: &[u8],
    endpoint: &str,
) -> Answer {
    let mut files: Vec<(String, StoredFile)> = Vec::new();
    let mut deleted: Vec<String> = Vec::new();
    let mut summary = None;
    let b64 = base64::engine::general_purpose::STANDARD;
    for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            return error(400, "commit line is not JSON");
        };
        let value = &v["value"];
        match v["key"].as_str() {
            Some("header") => summary = value["summary"].as_str().map(str::to_string),
            Some("file") => {
                let (Some(p), Some(c)) = (value["path"].as_str(), value["content"].as_str()) else {
                    return error(400, "file entry without path or content");
                };
                let Ok(content) = b64.decode(c) else {
                    return error(400, "file content is not base64");
                };
                if p.ends_with(".safetensors") {
                    return error(
                        400,
                        &format!("{p}: binary files must be uploaded through LFS"),
                    );
                }
                files.push((p.to_string(), StoredFile::new(content, false)));
            }
            Some("lfsFile") => {
                let (Some(p), Some(oid), Some(size)) = (
                    value["path"].as_str(),
                    value["oid"].as_str(),
                    value["size"].as_u64(),
                ) else {
                    return error(400, "lfsFile entry without path, oid or size");
                };
                match st.lfs.get(oid) {
                    Some(c) if c.len() as u64 == size => {
                        files.push((p.to_string(), StoredFile::new(c.clone(), true)))
                    }
                    _ => return error(422, &format!("{p}: LFS object {oid} was never uploaded")),
                }
            }
            Some("deletedFile") => deleted.push(value["path"].as_str().unwrap_or("").into()),
            other => return error(400, &format!("unknown commit key {other:?}")),
        }
    }
    let Some(summary) = summary.filter(|s| !s.is_empty()) else {
        return error(400, "a commit needs a header with a summary");
    };
    st.commits += 1;
    let oid = commit_id(st.commits);
    let Some(repo) = st.repos.get_mut(id) else {
        return error(404, "Repository not found");
    };
    let Some(base) = repo.branches.get(rev).cloned() else {
        return error(404, &format!("Invalid rev id: {rev}"));
    };
    let (target, pr) = if create_pr {
        repo.prs += 1;
        (format!("refs/pr/{}", repo.prs), Some(repo.prs))
    } else {
        (rev.to_string(), None)
    };
    let mut b = base;
    b.commit = oid.clone();
    for (p, f) in files {
        b.files.insert(p, f);
    }
    for p in deleted {
        b.files.remove(&p);
    }
    repo.branches.insert(target, b);
    repo.commit_messages.push(summary);
    let mut out = json!({
        "commitUrl": format!("{endpoint}/{id}/commit/{oid}"),
        "commitOid": oid,
        "commitMessage": repo.commit_messages.last(),
    });
    if let Some(n) = pr {
        out["pullRequestUrl"] = json!(format!("{endpoint}/{id}/discussions/{n}"));
    }
    json_answer(200, out)
}
