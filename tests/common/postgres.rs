//! PostgreSQL for tests: a fresh database per test on the server at `FLEETWATCH_TEST_POSTGRES_URL`
//! (default: the local server, `postgres://postgres@127.0.0.1:5432/postgres`). A test that needs it
//! fails when the server does not answer; it never passes without it.

/// The server tests create their databases on.
pub fn server_url() -> String {
    std::env::var("FLEETWATCH_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Creates an empty database named `fleetwatch_test_*` and returns its URL (`scripts/test.sh`
/// drops those left by earlier runs).
pub async fn fresh_database() -> String {
    let server = server_url();
    let (client, connection) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {server} (FLEETWATCH_TEST_POSTGRES_URL): {e}"));
    tokio::spawn(connection);
    let name = format!("fleetwatch_test_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("CREATE DATABASE");
    let (base, _) = server
        .rsplit_once('/')
        .expect("a database URL ends with /name");
    format!("{base}/{name}")
}
