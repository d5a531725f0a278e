pub mod attach;
pub mod bridge;
pub mod load;
pub mod load_app;
pub mod maps;
pub mod objects;
pub mod run;
pub mod unload;
