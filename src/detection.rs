//! The detector's output type: one box with its score and class, in original-image pixels.

use serde::Serialize;

/// One detected object. Coordinates are in pixels of the original image (not the 512x512
/// network input), `x1,y1` top-left and `x2,y2` bottom-right. `class_id` is 1-based as in
/// effdet and COCO (1 = person).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Detection {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
    pub score: f32,
    pub class_id: u32,
    pub label: String,
}

impl Detection {
    /// Width of the box in pixels.
    pub fn width(&self) -> f32 {
        self.x2 - self.x1
    }
    /// Height of the box in pixels.
    pub fn height(&self) -> f32 {
        self.y2 - self.y1
    }
}
