//! The images being served, in memory: a small LRU keyed by SHA-256, so a
//! thousand devices downloading one image read its file once. Loads run on
//! the blocking pool, one at a time (concurrent misses for the same image
//! wait for the first load instead of reading the file again).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::ImageFiles;

/// Images kept in memory.
pub const CACHED_IMAGES_MAX: usize = 4;

/// An image in memory, by SHA-256.
type Entry = ([u8; 32], Arc<[u8]>);

/// The LRU.
#[derive(Debug)]
pub struct ImageCache {
    files: ImageFiles,
    /// Most recently used first.
    entries: Mutex<VecDeque<Entry>>,
    loading: tokio::sync::Mutex<()>,
}

impl ImageCache {
    /// An empty cache over `files`.
    pub fn new(files: ImageFiles) -> Self {
        Self { files, entries: Mutex::default(), loading: tokio::sync::Mutex::new(()) }
    }

    /// The image with this SHA-256, from memory or its file.
    pub async fn get(&self, sha256: &[u8; 32]) -> std::io::Result<Arc<[u8]>> {
        if let Some(image) = self.lookup(sha256) {
            return Ok(image);
        }
        let _loading = self.loading.lock().await;
        if let Some(image) = self.lookup(sha256) {
            return Ok(image);
        }
        let files = self.files.clone();
        let sha = *sha256;
        let image: Arc<[u8]> = tokio::task::spawn_blocking(move || files.read(&sha))
            .await
            .map_err(std::io::Error::other)??
            .into();
        if let Ok(mut entries) = self.entries.lock() {
            entries.push_front((*sha256, image.clone()));
            entries.truncate(CACHED_IMAGES_MAX);
        }
        Ok(image)
    }

    fn lookup(&self, sha256: &[u8; 32]) -> Option<Arc<[u8]>> {
        let mut entries = self.entries.lock().ok()?;
        let index = entries.iter().position(|(sha, _)| sha == sha256)?;
        let entry = entries.remove(index)?;
        let image = entry.1.clone();
        entries.push_front(entry);
        Some(image)
    }

    /// How many images are in memory.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    #[tokio::test]
    async fn keeps_the_most_recently_used_images() {
        let dir = tempfile::tempdir().unwrap();
        let files = ImageFiles::new(dir.path());
        let mut shas = Vec::new();
        for n in 0..=CACHED_IMAGES_MAX as u8 {
            let image = vec![n; 100];
            let sha: [u8; 32] = Sha256::digest(&image).into();
            files.write(&sha, &image).unwrap();
            shas.push(sha);
        }
        let cache = ImageCache::new(files.clone());
        for sha in &shas {
            cache.get(sha).await.unwrap();
        }
        assert_eq!(cache.len(), CACHED_IMAGES_MAX);
        // The newest images are served from memory even with their files gone.
        for sha in &shas[1..] {
            std::fs::remove_file(files.path(sha)).unwrap();
            assert_eq!(cache.get(sha).await.unwrap().len(), 100);
        }
        // The oldest was evicted and is read from its file again.
        assert_eq!(cache.get(&shas[0]).await.unwrap()[0], 0);
    }
}
