"""DifferNet settings: edit a value here, or override it with `python main.py --NAME VALUE`.

Values only, one comment each; nothing runs on import. Defaults are the paper's values and the
official implementation's (marco-rudolph/differnet, commit 9bdf026) unless a comment says otherwise.
"""

# --- data ---
dataset_path = 'data/demo'  # folder holding one sub-folder per class; 'data/demo' is generated on first use
class_name = 'demo_washer'  # class folder to train on; a comma-separated list runs several; 'all' runs every class
results_dir = ''  # where results.json goes; '' makes a fresh folder under results/
img_size = 448  # side of the square network input in pixels (paper: 448)

# --- augmentation ---
transf_rotations = True  # random rotation in [-180, 180] degrees for training and test views
transf_brightness = 0.0  # ColorJitter brightness factor (0 disables)
transf_contrast = 0.0  # ColorJitter contrast factor (0 disables)
transf_saturation = 0.0  # ColorJitter saturation factor (0 disables)
norm_mean = (0.485, 0.456, 0.406)  # ImageNet channel means used by the pretrained AlexNet
norm_std = (0.229, 0.224, 0.225)  # ImageNet channel standard deviations
fixed_test_rotations = False  # deviation: test views at angles i*360/n instead of random ones

# --- network ---
n_scales = 3  # input scales 448, 224, 112: 256 features each, concatenated
n_coupling_blocks = 8  # GLOW coupling blocks in the flow
clamp_alpha = 3.0  # soft clamp alpha of the coupling scales
fc_internal = 2048  # hidden width of each coupling subnet
dropout = 0.0  # dropout before each ReLU of the subnets
pretrained = True  # ImageNet AlexNet weights; False gives random weights (tests only, printed loudly)
weights_path = ''  # optional local AlexNet weights (.pth): full torchvision state dict or `features` one

# --- optimisation ---
lr_init = 2e-4  # Adam learning rate
adam_betas = (0.8, 0.8)  # Adam betas
adam_eps = 1e-4  # Adam epsilon
weight_decay = 1e-5  # Adam (L2) weight decay
max_grad_norm = 0.0  # deviation when > 0: clip the flow's gradient norm (helps MVTec grid); 0 = off, as the paper
adam_fused = True  # speed-up: fused Adam kernel, same update up to float rounding (False = PyTorch default)
meta_epochs = 24  # evaluations on the test set; training runs meta_epochs x sub_epochs epochs
sub_epochs = 8  # training epochs between two evaluations
n_transforms = 4  # random views of each training image per epoch
n_transforms_test = 64  # random views of each test image; its score is the mean z^2 over them
batch_size = 24  # training images per step (each with n_transforms views: 96 feature vectors)
batch_size_test = 1  # test images per flow pass (official: batch_size * n_transforms // n_transforms_test)
extract_batch_size = 16  # views per AlexNet pass; memory and float rounding only
extract_batch_size_cuda = 256  # views per AlexNet pass on a CUDA device (16 leaves a GPU mostly idle); memory only

# --- speed (docs/performance.md and docs/faithfulness.md: each measured against the official behaviour) ---
train_feature_pool = 0  # K > 0: extract K random views per training image once, draw n_transforms per epoch from them
cache_test_features = True  # deviation: draw the test views once per class (from the seed) and reuse them every meta epoch (no AUROC direction, measured)
feature_cache = True  # keep extracted pool/test features on disk, keyed by files, settings, seed and weights
feature_cache_dir = 'data/feature_cache'  # where the disk cache of features lives
view_backend = 'auto'  # 'pil' (official: views made one by one on PIL images), 'tensor' (images kept as uint8 tensors, views made in batches on the device, same pixels), 'auto': tensor on CUDA, pil on a CPU (the faster on each)
channels_last = True  # speed-up: NHWC AlexNet convolutions, equal up to float rounding
cpu_flow_kernel = 'auto'  # the flow's fp32 products on a CPU: 'default' (PyTorch's: MKL on x86), 'onednn', 'auto' (oneDNN on AMD CPUs, where MKL is slow; default elsewhere)
bf16_autocast = False  # True: bfloat16 AlexNet and flow (changes numbers; not a default by the parity rule); 'auto': bf16 where faster (CUDA, AMX CPUs)

# --- checkpoints, scoring, gradient maps ---
save_checkpoint = True  # write <class>_checkpoint.pt and its reference scores at the end of each job (the start-of-run disk line says its size); False for sweeps
save_best = False  # also save <class>_best.pt at the meta epoch of the highest AUROC (independent of save_checkpoint)
n_train_images = 0  # K > 0: train on a seeded random K of the training images (the paper's 16-image claim; nested: the 16 of a seed are among its 64); 0 = all, as the paper
val_fraction = 0.0  # share of train/good kept out of training (seeded) to set the --score threshold; 0 uses the training images
max_reference_images = 32  # training images scored at fixed rotations for the checkpoint's score statistics (0 = all)
threshold_fpr = 0.01  # --score threshold: the score this share of held-out (or training) defect-free images exceeds
grad_map_viz = False  # after training, gradient-map PNGs of the anomalous test images and pixel AUROC (ours) where masks exist

# --- run ---
seed = 0  # seeds Python, numpy and torch; the same seed on CPU gives the same numbers
seeds = ()  # several seeds, e.g. 0,1,2: one run per (class, seed), tables give mean ± std; () runs `seed`
device = 'auto'  # 'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'
num_workers = 0  # DataLoader worker processes decoding and augmenting images
verbose = True  # print the loss of every sub epoch and the AUROC of every meta epoch
hide_tqdm_bar = True  # hide progress bars (official default)
resume_state = True  # write the state --resume needs after a meta epoch (the flow and Adam's moments: the disk line says its size)
resume_interval_s = 120  # write the resume state only when this many seconds passed since the last write (0: every meta epoch)
