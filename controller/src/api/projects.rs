//! `/1.0/projects`: tenants' slices of the cluster, with quotas. (Being written.)

use axum::response::Response;

use super::{ApiError, Identity};

fn pending() -> ApiError {
    ApiError::new(
        http::StatusCode::NOT_IMPLEMENTED,
        "projects are being built",
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
pub async fn put(_who: Identity) -> Result<Response, ApiError> {
    Err(pending())
}
pub async fn patch(_who: Identity) -> Result<Response, ApiError> {
    Err(pending())
}
pub async fn delete(_who: Identity) -> Result<Response, ApiError> {
    Err(pending())
}
pub async fn rename(_who: Identity) -> Result<Response, ApiError> {
    Err(pending())
}
pub async fn get_state(_who: Identity) -> Result<Response, ApiError> {
    Err(pending())
}
