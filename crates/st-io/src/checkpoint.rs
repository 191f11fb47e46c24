//! Opening a checkpoint: one `.safetensors` file, or a folder in the Hugging Face layout (one
//! `model.safetensors`, or shards listed by `model.safetensors.index.json`), memory-mapped.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use serde::Serialize;
use serde_json::Value;

use crate::config::ModelConfig;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::header::{Header, HeaderTensor};
use crate::layout::{self, ModelLayout};

/// The file name of a single-file Hugging Face checkpoint.
pub const SINGLE_FILE_NAME: &str = "model.safetensors";
/// The file name of a sharded checkpoint's index.
pub const INDEX_FILE_NAME: &str = "model.safetensors.index.json";
/// The model configuration's file name.
pub const CONFIG_FILE_NAME: &str = "config.json";

/// How the checkpoint is laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayoutKind {
    /// A `.safetensors` file given directly.
    SingleFile,
    /// A folder with one safetensors file.
    Folder,
    /// A folder with shards and `model.safetensors.index.json`.
    Sharded,
}

/// One tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// Absolute byte offset of the first data byte in its file.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
}

/// One memory-mapped safetensors file of the checkpoint.
#[derive(Debug)]
pub struct ShardFile {
    pub path: PathBuf,
    /// The name relative to the checkpoint folder (or the file name).
    pub name: String,
    pub len: u64,
    pub header_len: u64,
    pub metadata: Option<Vec<(String, String)>>,
    // Declared before `map`: unregistered before the mapping goes away.
    guard: crate::mapguard::MapGuard,
    map: Mmap,
}

impl ShardFile {
    /// Maps and validates one safetensors file.
    pub fn open(path: &Path, name: String) -> Result<ShardFile> {
        ShardFile::open_with_tensors(path, name).map(|(file, _)| file)
    }

    fn open_with_tensors(path: &Path, name: String) -> Result<(ShardFile, Vec<HeaderTensor>)> {
        let file = crate::paths::open_regular(path)?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let len = meta.len();
        if len < 8 {
            return Err(Error::FileTooShort {
                file: path.to_path_buf(),
                len,
            });
        }
        // SAFETY: a shared, read-only mapping (shared so that the GPU upload can register it),
        // whose references never outlive `self`. What it assumes: nobody writes the file in
        // place while we read it. A file another process truncates or rewrites is not prevented
        // but caught: a read past its new end faults, `mapguard` turns the fault into zeros
        // and a mark, and `check_intact` (which every verb calls before it presents a result)
        // reports the file; new contents written in place are caught by the size and identity
        // checks only when the size changed.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let guard = crate::mapguard::MapGuard::new(&map, &meta);
        let header = Header::parse(path, &map)?;
        let file = ShardFile {
            path: path.to_path_buf(),
            name,
            len,
            header_len: header.header_len,
            metadata: header.metadata,
            guard,
            map,
        };
        Ok((file, header.tensors))
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// An error naming the file when it shrank, grew or was replaced since it was mapped (what
    /// was read from it may then be zeros or stale, and must not be used).
    pub fn check_intact(&self) -> Result<()> {
        self.guard
            .check(&self.path)
            .map_err(|message| Error::ChangedWhileRead {
                file: self.path.clone(),
                message,
            })
    }
}

/// A problem worth reporting that does not stop the checkpoint from being used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file, tensor or field concerned.
    pub subject: String,
    pub message: String,
}

/// An opened, validated checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    root: PathBuf,
    kind: LayoutKind,
    files: Vec<ShardFile>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    config: Option<ModelConfig>,
    problems: Vec<Problem>,
}

impl Checkpoint {
    /// Every file of the checkpoint is still the file that was mapped, with its length, and no
    /// read of it faulted: call it after the last read and before presenting a result.
    pub fn check_intact(&self) -> Result<()> {
        self.files.iter().try_for_each(ShardFile::check_intact)
    }

    /// Opens a `.safetensors` file or a Hugging Face model folder.
    /// ```
    /// # let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/models/tiny-llama");
    /// let ckpt = st_io::Checkpoint::open(model)?; // the folder: three shards and their index
    /// assert_eq!(ckpt.files().len(), 3);
    /// assert_eq!(ckpt.tensors().len(), 30);
    /// // A missing file is an error naming it, never a panic.
    /// let e = st_io::Checkpoint::open("no/such/model").unwrap_err();
    /// assert!(e.to_string().contains("no/such/model"));
    /// # Ok::<(), st_io::Error>(())
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return open_folder(path);
        }
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if file_name.ends_with(".safetensors.index.json") {
            let folder = path.parent().unwrap_or(Path::new("."));
            return open_sharded(folder, path);
        }
        if let Some(message) = unsupported_weights_message(file_name) {
            return Err(Error::NotACheckpoint {
                path: path.to_path_buf(),
                message,
            });
        }
        let file = ShardFile::open_with_tensors(path, file_name.to_string())?;
        let mut problems = Vec::new();
        let config_path = path.with_file_name(CONFIG_FILE_NAME);
        let config = read_config_if_present(&config_path)?;
        if config.is_none() {
            problems.push(Problem {
                subject: CONFIG_FILE_NAME.into(),
                message: "no config.json beside the file: layer count, heads and KV cache size are unknown".into(),
            });
        }
        Checkpoint::assemble(
            path.to_path_buf(),
            LayoutKind::SingleFile,
            vec![file],
            config,
            problems,
        )
    }

    fn assemble(
        root: PathBuf,
        kind: LayoutKind,
        opened: Vec<(ShardFile, Vec<HeaderTensor>)>,
        config: Option<ModelConfig>,
        problems: Vec<Problem>,
    ) -> Result<Checkpoint> {
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        let mut files = Vec::with_capacity(opened.len());
        for (file_index, (file, header_tensors)) in opened.into_iter().enumerate() {
            let data_start = 8 + file.header_len;
            for t in header_tensors {
                if by_name.contains_key(&t.name) {
                    return Err(Error::DuplicateTensor {
                        file: file.path.clone(),
                        tensor: t.name,
                    });
                }
                by_name.insert(t.name.clone(), tensors.len());
                tensors.push(TensorInfo {
                    name: t.name,
                    dtype: t.dtype,
                    shape: t.shape,
                    file: file_index,
                    offset: data_start + t.begin,
                    len: t.end - t.begin,
                });
            }
            files.push(file);
        }
        Ok(Checkpoint {
            root,
            kind,
            files,
            tensors,
            by_name,
            config,
            problems,
        })
    }

    /// The path that was opened (file or folder).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn kind(&self) -> LayoutKind {
        self.kind
    }

    pub fn files(&self) -> &[ShardFile] {
        &self.files
    }

    /// All tensors, file by file, in data order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The position of a tensor in [`Checkpoint::tensors`].
    pub fn tensor_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The bytes of a tensor, straight from the map (no copy).
    pub fn tensor_bytes(&self, tensor: &TensorInfo) -> &[u8] {
        let start = tensor.offset as usize;
        &self.files[tensor.file].bytes()[start..start + tensor.len as usize]
    }

    pub fn config(&self) -> Option<&ModelConfig> {
        self.config.as_ref()
    }

    /// Non-fatal problems found while opening.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// Sum of all tensor bytes.
    pub fn total_tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len).sum()
    }

    /// The tensors this checkpoint lacks, or has beyond, its architecture ([`crate::arch`]).
    pub fn completeness(&self) -> crate::arch::Completeness {
        crate::arch::completeness(
            self.tensors.iter().map(|t| t.name.as_str()),
            self.config.as_ref(),
        )
    }

    /// The file a missing tensor belongs in: the file of the tensor beside it.
    pub fn file_beside(&self, missing: &crate::arch::Missing) -> Option<&str> {
        let beside = self.tensor(missing.beside.as_deref()?)?;
        Some(self.files[beside.file].name.as_str())
    }

    /// Refuses a checkpoint with a tensor missing ([`Error::Incomplete`], naming the first
    /// and the file it belongs in). plan, load and merge call it before any byte is copied.
    pub fn require_complete(&self) -> Result<()> {
        let c = self.completeness();
        match c.missing.first() {
            None => Ok(()),
            Some(m) => Err(Error::Incomplete {
                path: self.root.clone(),
                tensor: m.tensor.clone(),
                reason: m.reason.clone(),
                file: self.file_beside(m).map(String::from),
                more: c.missing.len() - 1,
            }),
        }
    }

    /// The placement units of this checkpoint, in model order.
    pub fn layout(&self) -> ModelLayout {
        let config = self.config.as_ref();
        layout::group(
            self.tensors.iter().map(|t| (t.name.as_str(), t.len)),
            config.and_then(|c| c.num_hidden_layers),
            config.and_then(|c| c.tie_word_embeddings),
        )
    }
}

fn unsupported_weights_message(file_name: &str) -> Option<String> {
    let lower = file_name.to_ascii_lowercase();
    if lower.ends_with(".bin") || lower.ends_with(".pt") || lower.ends_with(".pth") {
        Some("PyTorch pickle weights are not read (they can run code when loaded); convert them to safetensors first, e.g. with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)".into())
    } else if lower.ends_with(".gguf") {
        Some("GGUF files are not supported; use the safetensors checkpoint of the model".into())
    } else {
        None
    }
}

fn read_config_if_present(path: &Path) -> Result<Option<ModelConfig>> {
    match crate::paths::read_regular(path) {
        Ok(bytes) => ModelConfig::parse(path, &bytes).map(Some),
        Err(Error::NotFound { .. }) => Ok(None),
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn open_folder(folder: &Path) -> Result<Checkpoint> {
    let index = folder.join(INDEX_FILE_NAME);
    if index.exists() {
        return open_sharded(folder, &index);
    }
    let single = folder.join(SINGLE_FILE_NAME);
    let (file_path, name) = if single.exists() {
        (single, SINGLE_FILE_NAME.to_string())
    } else {
        let entries = list_folder(folder)?;
        let safetensors: Vec<&String> = entries
            .iter()
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        match safetensors.as_slice() {
            [one] => (folder.join(one), (*one).clone()),
            [] => {
                let message = match entries.iter().find_map(|n| unsupported_weights_message(n)) {
                    Some(m) => format!("no safetensors weights in this folder; {m}"),
                    None => "no safetensors weights in this folder (expected model.safetensors, or shards with model.safetensors.index.json)".into(),
                };
                return Err(Error::NotACheckpoint {
                    path: folder.to_path_buf(),
                    message,
                });
            }
            many => {
                return Err(Error::NotACheckpoint {
                    path: folder.to_path_buf(),
                    message: format!(
                        "{} .safetensors files and no model.safetensors.index.json to say how they fit together; open one file directly",
                        many.len()
                    ),
                })
            }
        }
    };
    check_inside(folder, &file_path, &name, folder)?;
    let file = ShardFile::open_with_tensors(&file_path, name)?;
    let (config, problems) = folder_config(folder)?;
    Checkpoint::assemble(
        folder.to_path_buf(),
        LayoutKind::Folder,
        vec![file],
        config,
        problems,
    )
}

fn folder_config(folder: &Path) -> Result<(Option<ModelConfig>, Vec<Problem>)> {
    let config = read_config_if_present(&folder.join(CONFIG_FILE_NAME))?;
    let mut problems = Vec::new();
    if config.is_none() {
        problems.push(Problem {
            subject: CONFIG_FILE_NAME.into(),
            message:
                "the folder has no config.json: layer count, heads and KV cache size are unknown"
                    .into(),
        });
    }
    Ok((config, problems))
}

fn list_folder(folder: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))? {
        let entry = entry.map_err(|e| Error::io(folder, e))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// The parsed `model.safetensors.index.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIndex {
    pub total_size: Option<u64>,
    /// Tensor name → shard file name, in file order.
    pub weight_map: Vec<(String, String)>,
}

impl ShardIndex {
    /// Parses index bytes; `file` names the file in errors.
    pub fn parse(file: &Path, bytes: &[u8]) -> Result<ShardIndex> {
        let bad = |message: String| Error::BadIndex {
            file: file.to_path_buf(),
            message,
        };
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let Value::Object(top) = value else {
            return Err(bad("must be a JSON object".into()));
        };
        let total_size = match top.get("metadata") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => match m.get("total_size") {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_u64()
                        .or_else(|| {
                            v.as_f64()
                                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19)
                                .map(|f| f as u64)
                        })
                        .ok_or_else(|| {
                            bad(format!(
                                "\"metadata.total_size\" must be a non-negative integer, found {v}"
                            ))
                        })?,
                ),
            },
            Some(v) => return Err(bad(format!("\"metadata\" must be an object, found {v}"))),
        };
        let weight_map = match top.get("weight_map") {
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Err(bad(format!(
                        "\"weight_map\" entry \"{k}\" must name a file, found {other}"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?,
            Some(v) => return Err(bad(format!("\"weight_map\" must be an object, found {v}"))),
            None => return Err(bad("missing \"weight_map\"".into())),
        };
        if weight_map.is_empty() {
            return Err(bad("\"weight_map\" is empty".into()));
        }
        Ok(ShardIndex {
            total_size,
            weight_map,
        })
    }
}

fn open_sharded(folder: &Path, index_path: &Path) -> Result<Checkpoint> {
    let bytes = crate::paths::read_regular(index_path)?;
    let index = ShardIndex::parse(index_path, &bytes)?;
    // Shard name → first tensor mapped to it, in shard-name order.
    let mut shards: BTreeMap<&str, &str> = BTreeMap::new();
    for (tensor, shard) in &index.weight_map {
        shards.entry(shard.as_str()).or_insert(tensor.as_str());
    }
    let mut files = Vec::with_capacity(shards.len());
    for (shard, first_tensor) in &shards {
        check_shard_name(index_path, shard)?;
        let path = folder.join(shard);
        if !path.exists() {
            return Err(Error::MissingShard {
                index: index_path.to_path_buf(),
                shard: shard.to_string(),
                tensor: first_tensor.to_string(),
            });
        }
        check_inside(folder, &path, shard, index_path)?;
        files.push(ShardFile::open_with_tensors(&path, shard.to_string())?);
    }
    let (config, mut problems) = folder_config(folder)?;
    let checkpoint = Checkpoint::assemble(
        folder.to_path_buf(),
        LayoutKind::Sharded,
        files,
        config,
        Vec::new(),
    )?;
    // Every tensor of every shard is in the index under that shard, and the reverse.
    let mapped: HashMap<&str, &str> = index
        .weight_map
        .iter()
        .map(|(t, s)| (t.as_str(), s.as_str()))
        .collect();
    for t in checkpoint.tensors() {
        let shard = checkpoint.files[t.file].name.as_str();
        match mapped.get(t.name.as_str()) {
            Some(s) if *s == shard => {}
            other => {
                return Err(Error::TensorNotInIndex {
                    index: index_path.to_path_buf(),
                    tensor: t.name.clone(),
                    shard: shard.to_string(),
                    mapped_to: other.map(|s| s.to_string()),
                })
            }
        }
    }
    for (tensor, shard) in &index.weight_map {
        if checkpoint.tensor(tensor).is_none() {
            return Err(Error::TensorMissingFromShard {
                index: index_path.to_path_buf(),
                tensor: tensor.clone(),
                shard: shard.clone(),
            });
        }
    }
    let actual = checkpoint.total_tensor_bytes();
    if let Some(declared) = index.total_size {
        if declared != actual {
            problems.push(Problem {
                subject: INDEX_FILE_NAME.into(),
                message: format!(
                    "metadata.total_size says {declared} bytes but the shards hold {actual} bytes of tensors"
                ),
            });
        }
    }
    for name in list_folder(folder)? {
        if name.ends_with(".safetensors") && !shards.contains_key(name.as_str()) {
            problems.push(Problem {
                subject: name.clone(),
                message: "this .safetensors file is not named by the index and is ignored (left over from an earlier save?)".into(),
            });
        }
    }
    Ok(Checkpoint {
        problems,
        ..checkpoint
    })
}

/// Rejects shard names that could leave the folder before touching the file system.
fn check_shard_name(index_path: &Path, shard: &str) -> Result<()> {
    let reason = if shard.is_empty() {
        Some("is empty")
    } else if Path::new(shard).is_absolute() || shard.starts_with('/') || shard.starts_with('\\') {
        Some("is an absolute path")
    } else if Path::new(shard)
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
        || shard.split(['/', '\\']).any(|p| p == "..")
    {
        Some("contains '..' or another non-plain path component")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::ShardOutsideFolder {
            index: index_path.to_path_buf(),
            shard: shard.to_string(),
            reason: reason.to_string(),
        }),
        None => Ok(()),
    }
}

/// Rejects a file whose real location (symlinks resolved) is outside the folder. The one
/// exception is the Hugging Face cache, whose `snapshots/<rev>/` files are symlinks into the
/// repository's `blobs/`: that is the normal way downloaded models are stored.
fn check_inside(folder: &Path, path: &Path, name: &str, reported_by: &Path) -> Result<()> {
    let outside = |target: &Path| Error::ShardOutsideFolder {
        index: reported_by.to_path_buf(),
        shard: name.to_string(),
        reason: format!(
            "resolves to {} (a symlink out of the folder)",
            target.display()
        ),
    };
    let real_folder = folder.canonicalize().map_err(|e| Error::io(folder, e))?;
    let real = path.canonicalize().map_err(|e| Error::io(path, e))?;
    if real.starts_with(&real_folder) {
        return Ok(());
    }
    // The HF cache: <repo>/snapshots/<rev>/<file> -> <repo>/blobs/<hash>.
    let is_hf_snapshot = real_folder
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "snapshots");
    if is_hf_snapshot {
        if let Some(repo) = real_folder.parent().and_then(Path::parent) {
            if real.parent() == Some(repo.join("blobs").as_path()) {
                return Ok(());
            }
        }
    }
    Err(outside(&real))
}
