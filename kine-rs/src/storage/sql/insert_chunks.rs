//! How a write batch's rows are cut into multi-row `INSERT`s: runs within a statement's
//! limits, each one statement padded to a power of two or power-of-two pieces, so that the
//! statements come in few shapes and stay prepared.

use super::{PendingRow, chunk_sizes};

/// Most rows one multi-row `INSERT` carries (MySQL, SQLite): 512 rows of 10 parameters stay
/// under every database's parameter limit (SQLite's 32,766), and a migration's page of 1,000
/// rows goes in a handful of statements.
pub(super) const MAX_INSERT_ROWS: usize = 512;
/// Most bytes of keys and values one multi-row `INSERT` carries: under MariaDB's default
/// `max_allowed_packet` (16 MiB) whatever the values' sizes.
const MAX_INSERT_BYTES: usize = 4 << 20;

/// The rows of one multi-row statement: the batch's own (`own` of them) and, after them,
/// its last repeated up to a power of two ([`Dialect::PADDED_INSERT`]).
pub(super) struct InsertChunk<'a, T> {
    pub(super) rows: Vec<&'a T>,
    pub(super) own: usize,
}

/// `run` as statements in few shapes: one padded to a power of two with its last row
/// (`pad`, where the repeats add at most [`MAX_INSERT_BYTES`] by `size`), else split into
/// power-of-two pieces.
pub(super) fn padded_or_split<'a, T>(
    run: &'a [T],
    pad: bool,
    size: impl Fn(&T) -> usize,
) -> Vec<InsertChunk<'a, T>> {
    if let (true, Some(last)) = (pad, run.last()) {
        let repeats = run.len().next_power_of_two() - run.len();
        if repeats.saturating_mul(size(last)) <= MAX_INSERT_BYTES {
            let mut rows: Vec<&T> = run.iter().collect();
            rows.resize(run.len() + repeats, last);
            return vec![InsertChunk {
                rows,
                own: run.len(),
            }];
        }
    }
    let mut chunks = Vec::new();
    let mut rest = run;
    for n in chunk_sizes(run.len(), MAX_INSERT_ROWS) {
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        chunks.push(InsertChunk {
            rows: chunk.iter().collect(),
            own: n,
        });
    }
    chunks
}

/// `rows` in runs for one `INSERT` each (before [`padded_or_split`]): at most
/// [`MAX_INSERT_BYTES`] (one row always) and [`MAX_INSERT_ROWS`].
pub(super) fn insert_runs(rows: &[PendingRow]) -> Vec<&[PendingRow]> {
    let mut chunks = Vec::new();
    let mut rest = rows;
    while !rest.is_empty() {
        let mut bytes = 0;
        let mut run = 0;
        while run < rest.len() && run < MAX_INSERT_ROWS {
            let size = rest[run].kv.key.len() + rest[run].kv.value.len();
            if run > 0 && bytes + size > MAX_INSERT_BYTES {
                break;
            }
            bytes += size;
            run += 1;
        }
        let (this, tail) = rest.split_at(run);
        rest = tail;
        chunks.push(this);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::{MAX_INSERT_BYTES, MAX_INSERT_ROWS, padded_or_split};

    /// Sizes of the statements `run` becomes, and how many rows of each are its own.
    fn shapes(run: &[usize], pad: bool) -> Vec<(usize, usize)> {
        padded_or_split(run, pad, |size| *size)
            .iter()
            .map(|chunk| (chunk.rows.len(), chunk.own))
            .collect()
    }

    #[test]
    fn a_run_is_one_statement_padded_with_its_last_row_or_power_of_two_pieces() {
        let small = vec![10; 57];
        assert_eq!(shapes(&small, true), [(64, 57)]);
        let chunks = padded_or_split(&small, true, |size| *size);
        assert!(
            chunks[0].rows[57..]
                .iter()
                .all(|row| std::ptr::eq(*row, &small[56]))
        );
        assert_eq!(shapes(&small, false), [(32, 32), (16, 16), (8, 8), (1, 1)]);
        assert_eq!(shapes(&[7; 64], true), [(64, 64)]);
        assert_eq!(shapes(&[], true), []);
        assert_eq!(
            shapes(&[1; MAX_INSERT_ROWS], true),
            [(MAX_INSERT_ROWS, MAX_INSERT_ROWS)]
        );
    }

    /// Repeats of a large last row would carry more than a statement may: split instead.
    #[test]
    fn repeats_of_a_large_row_are_split_instead() {
        let mut run = vec![10; 8];
        run.push(MAX_INSERT_BYTES / 2);
        assert_eq!(shapes(&run, true), [(8, 8), (1, 1)]);
        let mut run = vec![10; 6];
        run.push(MAX_INSERT_BYTES);
        assert_eq!(shapes(&run, true), [(8, 7)]);
    }
}
