//! # agora-wasm-validate
//!
//! Engine-free checks of a WebAssembly binary's bytes: is it Wasm, is it a command, does it
//! import only what Agora provides. Cheap enough to run at upload time, before any task is
//! launched.
//!
//! Why a crate of its own: the master's artifact store validates modules when they are uploaded,
//! and the Wasm executor validates them again before compiling. Both need the same answer, but
//! only the executor needs the wasmtime runtime (hundreds of crates, cranelift among them). This
//! crate depends on `wasmparser` alone, at the version wasmtime uses (pinned in the workspace's
//! `Cargo.toml`), so the master builds without wasmtime and the two never disagree on what a
//! valid module is.

use wasmparser::{Parser, Payload, Validator};

/// The import module name of WASI preview 1.
pub const WASI_P1_MODULE: &str = "wasi_snapshot_preview1";

/// Every function of WASI preview 1 (`wasi_snapshot_preview1`), all of which Agora links (the
/// socket functions are linked but refuse: tasks have no network).
pub const WASI_P1_FUNCTIONS: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

/// The WASI 0.2 packages a component may import from (at any `@0.2.x` version).
pub const WASI_P2_PACKAGES: &[&str] =
    &["wasi:cli/", "wasi:io/", "wasi:clocks/", "wasi:filesystem/", "wasi:random/", "wasi:sockets/"];

/// What kind of binary a module is, detected from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    /// A core module run as a WASI preview 1 command (`_start`).
    CoreModule,
    /// A component run as a WASI 0.2 command (`wasi:cli/run`).
    Component,
}

/// What [`validate`] learnt about an accepted module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Core module or component.
    pub kind: ModuleKind,
    /// The imports, as `module::name` for core modules and the full name for components.
    pub imports: Vec<String>,
}

/// Why a binary is not a WebAssembly command Agora can run.
///
/// Every variant names the failing import, export or decoder offset so that the message can be
/// shown to a user as is (e.g. by `agora run --wasm` at upload time).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    /// The bytes do not start with a WebAssembly header.
    #[error("not a WebAssembly module or component: {reason}")]
    NotWasm {
        /// What is wrong with the header.
        reason: String,
    },
    /// The bytes start like WebAssembly but do not decode or validate (e.g. a truncated module).
    #[error("invalid WebAssembly: {message}")]
    Invalid {
        /// The decoder's or validator's message, with the byte offset.
        message: String,
    },
    /// A core module that does not export a `_start` function.
    #[error(
        "module has no `_start` function export: Agora runs WASI command modules \
         (`wasm32-wasip1` binaries), not libraries (reactors)"
    )]
    NoStart,
    /// A component that does not export `wasi:cli/run@0.2.x`.
    #[error("component does not export `wasi:cli/run@0.2.x`: Agora runs WASI 0.2 command components only")]
    NoRun,
    /// A core module importing something outside WASI preview 1.
    #[error("import `{module}::{name}` is not provided: Agora offers WASI preview 1 only")]
    UnsupportedImport {
        /// The import's module name.
        module: String,
        /// The import's field name.
        name: String,
    },
    /// A component importing something outside WASI 0.2.
    #[error(
        "import `{name}` is not provided: Agora offers WASI 0.2 only \
         (wasi:cli, wasi:io, wasi:clocks, wasi:filesystem, wasi:random, wasi:sockets at @0.2.x)"
    )]
    UnsupportedComponentImport {
        /// The full import name, e.g. `wasi:http/types@0.2.0`.
        name: String,
    },
}

/// Checks that `bytes` are a WebAssembly command Agora can run.
///
/// Detects a core module or a component from the header, validates the whole binary, then checks
/// that a core module exports `_start` and imports only WASI preview 1 functions, or that a
/// component exports `wasi:cli/run@0.2.x` and imports only WASI 0.2 interfaces. The error names
/// the problem (the offending import, the missing export, the decoder's offset).
pub fn validate(bytes: &[u8]) -> Result<Checked, ModuleError> {
    let kind = detect_kind(bytes)?;
    Validator::new().validate_all(bytes).map_err(|e| ModuleError::Invalid { message: e.to_string() })?;
    let imports = match kind {
        ModuleKind::CoreModule => check_core(bytes)?,
        ModuleKind::Component => check_component(bytes)?,
    };
    Ok(Checked { kind, imports })
}

/// Detects a core module or a component from the first 8 bytes.
pub fn detect_kind(bytes: &[u8]) -> Result<ModuleKind, ModuleError> {
    if Parser::is_core_wasm(bytes) {
        return Ok(ModuleKind::CoreModule);
    }
    if Parser::is_component(bytes) {
        return Ok(ModuleKind::Component);
    }
    let reason = if !bytes.starts_with(b"\0asm") {
        if bytes.len() < 4 && b"\0asm".starts_with(bytes) {
            format!("only {} bytes, too short for the 8-byte header", bytes.len())
        } else {
            "missing the `\\0asm` magic number".to_owned()
        }
    } else if bytes.len() < 8 {
        format!("only {} bytes, too short for the 8-byte header", bytes.len())
    } else {
        format!("unsupported version/layer {:02x?} after the `\\0asm` magic number", &bytes[4..8])
    };
    Err(ModuleError::NotWasm { reason })
}

fn invalid(e: wasmparser::BinaryReaderError) -> ModuleError {
    ModuleError::Invalid { message: e.to_string() }
}

fn check_core(bytes: &[u8]) -> Result<Vec<String>, ModuleError> {
    let mut imports = Vec::new();
    let mut has_start = false;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(invalid)? {
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.map_err(invalid)?;
                    let provided = import.module == WASI_P1_MODULE
                        && matches!(import.ty, wasmparser::TypeRef::Func(_))
                        && WASI_P1_FUNCTIONS.contains(&import.name);
                    if !provided {
                        return Err(ModuleError::UnsupportedImport {
                            module: import.module.to_owned(),
                            name: import.name.to_owned(),
                        });
                    }
                    imports.push(format!("{}::{}", import.module, import.name));
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export.map_err(invalid)?;
                    if export.name == "_start" && export.kind == wasmparser::ExternalKind::Func {
                        has_start = true;
                    }
                }
            }
            _ => {}
        }
    }
    if !has_start {
        return Err(ModuleError::NoStart);
    }
    Ok(imports)
}

fn is_wasi_p2(name: &str) -> bool {
    WASI_P2_PACKAGES.iter().any(|pkg| name.starts_with(pkg))
        && name.rsplit_once('@').is_some_and(|(_, version)| version.starts_with("0.2."))
}

/// The full name of a component import or export (`name` plus any version suffix).
fn extern_name(name: &wasmparser::ComponentExternName<'_>) -> String {
    match name.version_suffix {
        Some(suffix) => format!("{}{suffix}", name.name),
        None => name.name.to_owned(),
    }
}

fn check_component(bytes: &[u8]) -> Result<Vec<String>, ModuleError> {
    let mut imports = Vec::new();
    let mut has_run = false;
    // Nested modules and components come flattened out of `parse_all`; only the outermost
    // component's imports and exports (depth 0) are the component's interface.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(invalid)? {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    let import = import.map_err(invalid)?;
                    let name = extern_name(&import.name);
                    if !is_wasi_p2(&name) {
                        return Err(ModuleError::UnsupportedComponentImport { name });
                    }
                    imports.push(name);
                }
            }
            Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    let export = export.map_err(invalid)?;
                    let name = extern_name(&export.name);
                    if name.starts_with("wasi:cli/run@0.2.") {
                        has_run = true;
                    }
                }
            }
            _ => {}
        }
    }
    if !has_run {
        return Err(ModuleError::NoRun);
    }
    Ok(imports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p2_import_names() {
        assert!(is_wasi_p2("wasi:cli/stdout@0.2.0"));
        assert!(is_wasi_p2("wasi:io/streams@0.2.6"));
        assert!(!is_wasi_p2("wasi:http/types@0.2.0"));
        assert!(!is_wasi_p2("wasi:cli/stdout@0.3.0"));
        assert!(!is_wasi_p2("wasi:cli/stdout"));
    }

    #[test]
    fn header_detection() {
        assert!(matches!(detect_kind(b"\0asm\x01\0\0\0"), Ok(ModuleKind::CoreModule)));
        assert!(matches!(detect_kind(b"\0asm\x0d\0\x01\0"), Ok(ModuleKind::Component)));
        assert!(matches!(detect_kind(b"#!/bin/sh"), Err(ModuleError::NotWasm { .. })));
        assert!(matches!(detect_kind(b"\0as"), Err(ModuleError::NotWasm { .. })));
        assert!(matches!(detect_kind(b"\0asm\x02\0\0\0"), Err(ModuleError::NotWasm { .. })));
    }
}
