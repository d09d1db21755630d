//! Binary `COPY … FROM STDIN` of one batch: the only code that writes rows to PostgreSQL.

use std::pin::{pin, Pin};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use deadpool_postgres::Pool;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

use crate::model::{LocationUpdate, PollResult};

/// A batch that does not finish in this time is abandoned (and retried): a hung connection must not stall a
/// writer forever.
const BATCH_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// A row type that can be written by binary `COPY`.
pub trait CopyRecord: Send + Sync + 'static {
    /// The `COPY` statement, with its column list.
    const COPY_STATEMENT: &'static str;
    /// The column types, in the order of the statement; checked by PostgreSQL against the table.
    const COLUMN_TYPES: &'static [Type];

    /// Writes this row's values, in column order.
    fn write_row(
        &self,
        writer: Pin<&mut BinaryCopyInWriter>,
    ) -> impl std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send;
}

/// What a committed batch took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOutcome {
    /// Rows PostgreSQL reports as copied.
    pub rows: u64,
    pub elapsed: Duration,
}

/// Why a batch was not written; every cause is worth a retry here (the rows were validated beforehand).
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("could not get a database connection")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("copy failed")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("copy did not finish within {0:?}")]
    Timeout(Duration),
}

/// Writes `rows` in one `COPY`; all of them or none (a `COPY` is one statement, atomic on its own).
pub async fn write_batch<T: CopyRecord>(pool: &Pool, rows: &[T]) -> Result<CopyOutcome, CopyError> {
    let started = Instant::now();
    let copy = async {
        let client = pool.get().await?;
        let sink = client.copy_in(T::COPY_STATEMENT).await?;
        let mut writer = pin!(BinaryCopyInWriter::new(sink, T::COLUMN_TYPES));
        for row in rows {
            row.write_row(writer.as_mut()).await?;
        }
        Ok::<u64, CopyError>(writer.finish().await?)
    };
    let rows = tokio::time::timeout(BATCH_WRITE_TIMEOUT, copy)
        .await
        .map_err(|_| CopyError::Timeout(BATCH_WRITE_TIMEOUT))??;
    Ok(CopyOutcome {
        rows,
        elapsed: started.elapsed(),
    })
}

/// A JSON document already serialized, sent as `jsonb` without a parse on this side.
#[derive(Debug)]
struct Jsonb<'a>(&'a str);

impl ToSql for Jsonb<'_> {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // The jsonb binary format is a version byte (1) followed by the JSON text.
        out.extend_from_slice(&[1]);
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}

impl CopyRecord for LocationUpdate {
    const COPY_STATEMENT: &'static str = "COPY location_updates (device_id, recorded_at, lat, lon, speed_kmh, \
        heading_deg, accuracy_m, attributes, received_at) FROM STDIN (FORMAT binary)";
    const COLUMN_TYPES: &'static [Type] = &[
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::FLOAT8,
        Type::FLOAT8,
        Type::FLOAT8,
        Type::FLOAT8,
        Type::FLOAT8,
        Type::JSONB,
        Type::TIMESTAMPTZ,
    ];

    async fn write_row(&self, writer: Pin<&mut BinaryCopyInWriter>) -> Result<(), tokio_postgres::Error> {
        let attributes = self.attributes.as_deref().map(Jsonb);
        writer
            .write(&[
                &self.device_id,
                &self.recorded_at,
                &self.lat,
                &self.lon,
                &self.speed_kmh,
                &self.heading_deg,
                &self.accuracy_m,
                &attributes,
                &self.received_at,
            ])
            .await
    }
}

impl CopyRecord for PollResult {
    const COPY_STATEMENT: &'static str = "COPY poll_results (project_id, polled_at, success, status_code, \
        response_time_ms, error_message, attributes, received_at) FROM STDIN (FORMAT binary)";
    const COLUMN_TYPES: &'static [Type] = &[
        Type::INT8,
        Type::TIMESTAMPTZ,
        Type::BOOL,
        Type::INT2,
        Type::INT4,
        Type::TEXT,
        Type::JSONB,
        Type::TIMESTAMPTZ,
    ];

    async fn write_row(&self, writer: Pin<&mut BinaryCopyInWriter>) -> Result<(), tokio_postgres::Error> {
        let attributes = self.attributes.as_deref().map(Jsonb);
        writer
            .write(&[
                &self.project_id,
                &self.polled_at,
                &self.success,
                &self.status_code,
                &self.response_time_ms,
                &self.error_message,
                &attributes,
                &self.received_at,
            ])
            .await
    }
}
