//! Allocators by name: the built-ins and those an embedder registers.

use super::*;

/// Makes an allocator from the operator's options.
pub type Factory = fn(&AllocatorOptions) -> Box<dyn Allocator>;

/// Allocators by name. [`Registry::builtin`] is the one place that lists the built-ins;
/// embedders and examples [`register`](Registry::register) more.
#[derive(Clone)]
pub struct Registry {
    factories: BTreeMap<String, Factory>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.factories.keys()).finish()
    }
}

/// A registry that could not do what was asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("unknown allocator `{name}` (known: {known})")]
    Unknown { name: String, known: String },
    #[error("an allocator named `{0}` is already registered")]
    Duplicate(String),
    #[error("invalid allocator name `{0}`: letters, digits, `_` or `-`")]
    InvalidName(String),
}

impl Registry {
    /// No allocators at all.
    pub fn empty() -> Self {
        Registry { factories: BTreeMap::new() }
    }

    /// The built-in allocators: `drf` (hierarchical weighted DRF) and `priority` (strict
    /// priority).
    pub fn builtin() -> Self {
        let mut r = Self::empty();
        r.factories.insert(HierarchicalAllocator::DRF.into(), |o| Box::new(HierarchicalAllocator::drf(o)));
        r.factories
            .insert(HierarchicalAllocator::PRIORITY.into(), |o| Box::new(HierarchicalAllocator::priority(o)));
        r
    }

    /// Adds an allocator under `name`.
    pub fn register(&mut self, name: &str, factory: Factory) -> Result<(), RegistryError> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(RegistryError::InvalidName(name.to_string()));
        }
        if self.factories.contains_key(name) {
            return Err(RegistryError::Duplicate(name.to_string()));
        }
        self.factories.insert(name.to_string(), factory);
        Ok(())
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.factories.keys().map(String::as_str).collect()
    }

    /// Creates the allocator registered as `name`.
    pub fn create(
        &self,
        name: &str,
        options: &AllocatorOptions,
    ) -> Result<Box<dyn Allocator>, RegistryError> {
        match self.factories.get(name) {
            Some(f) => Ok(f(options)),
            None => Err(RegistryError::Unknown { name: name.to_string(), known: self.names().join(", ") }),
        }
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::builtin()
    }
}

/// Names of the built-in allocators.
pub fn names() -> Vec<&'static str> {
    vec![HierarchicalAllocator::DRF, HierarchicalAllocator::PRIORITY]
}

/// Creates a built-in allocator by name with default options, or `None` if there is none
/// with that name.
pub fn by_name(name: &str) -> Option<Box<dyn Allocator>> {
    by_name_with(name, &AllocatorOptions::default())
}

/// Creates a built-in allocator by name with these options.
pub fn by_name_with(name: &str, options: &AllocatorOptions) -> Option<Box<dyn Allocator>> {
    Registry::builtin().create(name, options).ok()
}
