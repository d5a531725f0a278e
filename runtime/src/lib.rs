pub mod vm;
pub mod maps;
pub mod object;
pub mod verifier;
pub mod helpers;
