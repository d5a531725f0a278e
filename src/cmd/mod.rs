pub mod bridge;
pub mod maps;
