"""One-to-many auxiliary heads of Co-DETR (training only): ATSS and Faster R-CNN."""
