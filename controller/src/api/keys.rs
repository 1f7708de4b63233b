//! `/1.0/keys`: API keys, managed by admins. (Being written.)

use axum::response::Response;

use super::{ApiError, Identity};

fn pending() -> ApiError {
    ApiError::new(
        http::StatusCode::NOT_IMPLEMENTED,
        "key management is being built",
    )
}

pub async fn list(_who: Identity) -> Result<Response, ApiError> {
    Err(pending())
}
pub async fn create(_who: Identity) -> Result<Response, ApiError> {
    Err(pending())
}
pub async fn get_one(_who: Identity) -> Result<Response, ApiError> {
    Err(pending())
}
pub async fn delete(_who: Identity) -> Result<Response, ApiError> {
    Err(pending())
}
pub async fn rotate(_who: Identity) -> Result<Response, ApiError> {
    Err(pending())
}
