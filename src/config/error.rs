//! Configuration errors: every problem names the field path and the reason.

use std::fmt;

/// One invalid field: `spec.timeouts.connect: invalid duration "banana"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Which document of a multi-document source, e.g. `document 2 (shop/checkout)`.
    pub document: Option<String>,
    /// Dotted path from the document root, e.g. `spec.backends[1].url`.
    pub path: String,
    /// Why the value was rejected.
    pub message: String,
}

impl FieldError {
    /// Builds an error for `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            document: None,
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(doc) = &self.document {
            write!(f, "{doc}: ")?;
        }
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not YAML, or a document does not have the expected shape.
    #[error("{origin}: {message}")]
    Syntax {
        /// File name and document number.
        origin: String,
        /// What the parser said, with the field path where known.
        message: String,
    },
    /// The documents parsed but some fields are invalid.
    #[error("{origin}: {} invalid field(s):\n{}", .errors.len(), render(.errors))]
    Invalid {
        /// File name (and document) the errors belong to.
        origin: String,
        /// Every invalid field.
        errors: Vec<FieldError>,
    },
}

impl ConfigError {
    /// Every field-level error this error carries (empty for read and syntax errors).
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            ConfigError::Invalid { errors, .. } => errors,
            _ => &[],
        }
    }
}

fn render(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}
