//! The one error type of `st-io`.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing a checkpoint.
///
/// Each variant names the file and, where there is one, the tensor or field, so that the
/// message alone tells the user what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: no such file or folder", path.display())]
    NotFound { path: PathBuf },
    #[error("{}: is {kind}, not a regular file; weightsmith reads only regular files", path.display())]
    NotARegularFile { path: PathBuf, kind: &'static str },
    #[error("the output {} {how} the input {}: choose an output folder outside every input (nothing was written or removed)", output.display(), input.display())]
    OutputOverlapsInput {
        output: PathBuf,
        input: PathBuf,
        /// "is", "lies inside" or "contains".
        how: &'static str,
    },
    #[error("{}: --force replaces only a checkpoint folder or an empty one, and {why} ({}); choose another output folder", path.display(), file.display())]
    NotAnOutputFolder {
        path: PathBuf,
        /// The entry that made it so.
        file: PathBuf,
        why: String,
    },
    /// A tensor the architecture (or the other layers) says the checkpoint must have is not
    /// there: a partial download, a bad conversion, a shard left out.
    #[error("{}: tensor \"{tensor}\" is missing ({reason}){}{}: an incomplete or broken checkpoint; download or convert it again", path.display(), file.as_ref().map(|f| format!("; it belongs in {f}")).unwrap_or_default(), if *more > 0 { format!(", and {more} more tensor(s) are missing") } else { String::new() })]
    Incomplete {
        path: PathBuf,
        tensor: String,
        reason: String,
        /// The file it belongs in (where the tensors beside it are).
        file: Option<String>,
        /// How many more are missing.
        more: usize,
    },

    #[error("{}: {message}", file.display())]
    ChangedWhileRead { file: PathBuf, message: String },
    #[error("{}: writing {what} failed: {source}; the shard needs {} and nothing was put in place (a full disk or a file-size limit?)", file.display(), crate::format_decimal(*shard_bytes))]
    WriteFailed {
        /// The shard as it would have been named in the destination.
        file: PathBuf,
        /// `tensor "name"`, `the header`, or `its buffered bytes`.
        what: String,
        shard_bytes: u64,
        source: std::io::Error,
    },
    // ---- the safetensors header ----
    #[error("{}: file is {len} bytes, shorter than the 8-byte header length of a safetensors file", file.display())]
    FileTooShort { file: PathBuf, len: u64 },
    #[error("{}: header length {header_len} is over the 100 MB limit of the safetensors format (corrupt file?)", file.display())]
    HeaderTooLarge { file: PathBuf, header_len: u64 },
    #[error("{}: header length {header_len} runs past the end of the {file_len}-byte file (truncated download?)", file.display())]
    HeaderPastEnd {
        file: PathBuf,
        header_len: u64,
        file_len: u64,
    },
    #[error("{}: header is not UTF-8 (byte {offset} of the header)", file.display())]
    HeaderNotUtf8 { file: PathBuf, offset: usize },
    #[error("{}: header is not valid JSON: {message}", file.display())]
    HeaderNotJson { file: PathBuf, message: String },
    #[error("{}: tensor \"{tensor}\": {message}", file.display())]
    BadTensorEntry {
        file: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{}: \"__metadata__\" must map strings to strings: {message}", file.display())]
    BadMetadata { file: PathBuf, message: String },
    #[error("{}: tensor \"{tensor}\" has unknown dtype \"{dtype}\"", file.display())]
    UnknownDtype {
        file: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{}: tensor \"{tensor}\" appears twice in the header", file.display())]
    DuplicateTensor { file: PathBuf, tensor: String },
    #[error("{}: tensor \"{tensor}\" has {found} bytes but shape {shape:?} of {dtype} needs {expected}", file.display())]
    SizeMismatch {
        file: PathBuf,
        tensor: String,
        dtype: String,
        shape: Vec<u64>,
        expected: u64,
        found: u64,
    },
    #[error("{}: tensor \"{tensor}\": shape {shape:?} of {dtype} is too large to address or not a whole number of bytes", file.display())]
    ShapeOverflow {
        file: PathBuf,
        tensor: String,
        dtype: String,
        shape: Vec<u64>,
    },
    #[error("{}: tensor \"{tensor}\" has data_offsets [{begin}, {end}] with begin after end", file.display())]
    OffsetsReversed {
        file: PathBuf,
        tensor: String,
        begin: u64,
        end: u64,
    },
    #[error("{}: tensor \"{tensor}\" ends at data offset {end}, past the {data_len}-byte data area (truncated file?)", file.display())]
    OffsetOutOfBounds {
        file: PathBuf,
        tensor: String,
        end: u64,
        data_len: u64,
    },
    #[error("{}: tensors \"{first}\" and \"{second}\" overlap at data offset {offset}", file.display())]
    OverlappingTensors {
        file: PathBuf,
        first: String,
        second: String,
        offset: u64,
    },
    #[error("{}: data bytes [{begin}, {end}) belong to no tensor{}", file.display(), after.as_ref().map(|t| format!(" (after tensor \"{t}\")")).unwrap_or_default())]
    DataGap {
        file: PathBuf,
        begin: u64,
        end: u64,
        after: Option<String>,
    },

    // ---- folders, shards and the index ----
    #[error("{}: {message}", path.display())]
    NotACheckpoint { path: PathBuf, message: String },
    #[error("{}: {message}", file.display())]
    BadIndex { file: PathBuf, message: String },
    #[error("{}: shard \"{shard}\" {reason}; shard names must stay inside the checkpoint folder", index.display())]
    ShardOutsideFolder {
        index: PathBuf,
        shard: String,
        reason: String,
    },
    #[error("{}: shard \"{shard}\" (named for tensor \"{tensor}\") does not exist", index.display())]
    MissingShard {
        index: PathBuf,
        shard: String,
        tensor: String,
    },
    #[error("{}: tensor \"{tensor}\" is mapped to shard \"{shard}\" but that shard does not contain it", index.display())]
    TensorMissingFromShard {
        index: PathBuf,
        tensor: String,
        shard: String,
    },
    #[error("{}: tensor \"{tensor}\" of shard \"{shard}\" is not in the index{}", index.display(), mapped_to.as_ref().map(|s| format!(" under that shard (the index maps it to \"{s}\")")).unwrap_or_default())]
    TensorNotInIndex {
        index: PathBuf,
        tensor: String,
        shard: String,
        mapped_to: Option<String>,
    },

    // ---- config.json ----
    #[error("{}: {message}", file.display())]
    BadConfig { file: PathBuf, message: String },
    #[error("{}: field \"{field}\": {message}", file.display())]
    BadConfigField {
        file: PathBuf,
        field: String,
        message: String,
    },

    // ---- adapters ----
    #[error("{}: field \"{field}\": {message}", file.display())]
    BadAdapterConfig {
        file: PathBuf,
        field: String,
        message: String,
    },
    #[error("{}: tensor \"{tensor}\" {message}", file.display())]
    BadAdapterTensor {
        file: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{}: module \"{module}\" {message}", file.display())]
    BadAdapterModule {
        file: PathBuf,
        module: String,
        message: String,
    },

    // ---- quantised layers ----
    #[error("{}: tensor \"{tensor}\" {message}", file.display())]
    BadQuantizedTensor {
        file: PathBuf,
        tensor: String,
        message: String,
    },

    // ---- sizes, conversion, writing ----
    #[error("invalid size \"{input}\": {message}")]
    BadSize { input: String, message: String },
    #[error("cannot convert {from} to {to}: only F32, F16 and BF16 convert to F16 or BF16")]
    UnsupportedConversion { from: String, to: String },
    #[error("conversion of {from} to {to}: input has {input_bytes} bytes and output {output_bytes}, which are not the same number of elements")]
    ConversionLength {
        from: String,
        to: String,
        input_bytes: usize,
        output_bytes: usize,
    },
    #[error("{}: already exists; choose another destination or allow replacing it", path.display())]
    DestinationExists { path: PathBuf },
    #[error("{}: not enough free space: the checkpoint needs {}, the file system has {} free{}", path.display(), crate::size::format_decimal(*needed), crate::size::format_decimal(*available), if *replaced > 0 { format!(" counting the {} of the folder it replaces", crate::size::format_decimal(*replaced)) } else { String::new() })]
    NoSpace {
        path: PathBuf,
        needed: u64,
        /// Free bytes, with those of the folder being replaced.
        available: u64,
        /// Bytes the replaced folder frees (0 without one).
        replaced: u64,
    },
    #[error("writer: {message}")]
    WriterMisuse { message: String },
    #[error("writer: tensor \"{tensor}\" was given {found} bytes but shape {shape:?} of {dtype} needs {expected}")]
    WrongTensorBytes {
        tensor: String,
        dtype: String,
        shape: Vec<u64>,
        expected: u64,
        found: u64,
    },
    #[error("writer: tensor \"{tensor}\": {source}")]
    Producer {
        tensor: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { path }
        } else {
            Error::Io { path, source }
        }
    }
}
