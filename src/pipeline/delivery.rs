//! What a writer knows of where its updates came from: the checkpoint to record with the batch that holds them,
//! and whom to tell once that batch is committed. One opaque type for every source (memory has none, the
//! write-ahead log has a record position and a hold on its segment, a queue server would have a message to ack).

use crate::db::Checkpoint;

/// The source's side of a run of updates on their way to PostgreSQL.
pub trait Delivery: Send {
    /// The run is split: the first `at` updates stay with `self`, and the delivery of the rest is returned.
    fn split_off(&mut self, at: usize) -> Box<dyn Delivery>;
    /// The position to record in the transaction of the batch that ends with these updates, if the source keeps
    /// one; a later part of the same slot in the batch supersedes it.
    fn checkpoint(&self) -> Option<Checkpoint>;
    /// The updates are committed in PostgreSQL.
    fn committed(self: Box<Self>);
}

/// The checkpoints a batch records: the last one of each slot, in the order the slots first appear.
pub fn last_per_slot<'a>(deliveries: impl IntoIterator<Item = &'a dyn Delivery>) -> Vec<Checkpoint> {
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    for checkpoint in deliveries.into_iter().filter_map(|d| d.checkpoint()) {
        match checkpoints.iter_mut().find(|c| c.slot == checkpoint.slot) {
            Some(c) => *c = checkpoint,
            None => checkpoints.push(checkpoint),
        }
    }
    checkpoints
}
