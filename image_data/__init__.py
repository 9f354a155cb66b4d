"""The image folders a run reads: image files, dataset layouts (MVTec AD, BTAD, MTD), the demo set, tensor views."""
