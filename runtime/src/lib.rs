pub mod vm;
pub mod maps;
