//! Validation of a module before it is compiled: the engine-free checks of
//! [`agora_wasm_validate`] (shared with the master's artifact store), plus the digest and size the
//! runtime's caches key on.

pub use agora_wasm_validate::{detect_kind, ModuleKind, WASI_P1_FUNCTIONS, WASI_P1_MODULE, WASI_P2_PACKAGES};

use crate::digest::Digest;
use crate::error::WasmError;

/// What [`validate`] learnt about an accepted module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// Core module or component.
    pub kind: ModuleKind,
    /// The sha256 of the bytes.
    pub digest: Digest,
    /// The size of the bytes.
    pub size_bytes: usize,
    /// The imports, as `module::name` for core modules and the full name for components.
    pub imports: Vec<String>,
}

/// Checks that `bytes` are a WebAssembly command Agora can run ([`agora_wasm_validate::validate`])
/// and records their digest and size.
pub fn validate(bytes: &[u8]) -> Result<ModuleInfo, WasmError> {
    let checked = agora_wasm_validate::validate(bytes)?;
    Ok(ModuleInfo {
        kind: checked.kind,
        digest: Digest::of(bytes),
        size_bytes: bytes.len(),
        imports: checked.imports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_p1_function_list_matches_what_wasmtime_links() {
        let engine = wasmtime::Engine::default();
        let mut linker: wasmtime::Linker<wasmtime_wasi::p1::WasiP1Ctx> = wasmtime::Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |cx| cx).unwrap();
        let mut store = wasmtime::Store::new(&engine, wasmtime_wasi::WasiCtxBuilder::new().build_p1());
        let mut linked: Vec<String> = linker
            .iter(&mut store)
            .filter(|(module, _, _)| *module == WASI_P1_MODULE)
            .map(|(_, name, _)| name.to_owned())
            .collect();
        linked.sort();
        let mut ours: Vec<String> = WASI_P1_FUNCTIONS.iter().map(|s| (*s).to_owned()).collect();
        ours.sort();
        assert_eq!(linked, ours);
    }
}
