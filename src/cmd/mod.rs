pub mod attach;
pub mod bridge;
pub mod load;
pub mod maps;
pub mod run;
pub mod unload;
